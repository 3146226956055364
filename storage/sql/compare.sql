-- Operators across runs: table macros of the connection storage/compare.py:open_runs makes
-- over several runs of the same instances, each run's tables under its own name (a.instances,
-- b.attributions_ig, ...), `runs` listing them in order and `instances_by_run` holding every
-- run's instances with a `run` column. i-Algebra's join and anti-join, for us SQL.
-- Runs are named by text ('v1'); docs/sql.md "Across runs" has a worked example of each.

-- A run's table by its name and the table's ('v1', 'instances' → v1.instances).
CREATE MACRO _run_table(run, name) AS '"' || replace(run, '"', '""') || '".' || name;

-- Where two runs predict differently (the anti-join), with both confidences and the label.
-- Example: SELECT * FROM disagreements('v1', 'v2') ORDER BY confidence_a DESC LIMIT 20
CREATE MACRO disagreements(a, b) AS TABLE
    SELECT x.instance_id, x.label, x.prediction AS prediction_a, x.confidence AS confidence_a,
           y.prediction AS prediction_b, y.confidence AS confidence_b
    FROM query_table(_run_table(a, 'instances')) x JOIN query_table(_run_table(b, 'instances')) y USING (instance_id)
    WHERE x.prediction <> y.prediction;
COMMENT ON MACRO TABLE disagreements IS 'Instances two runs predict differently (anti-join), with the label and both predictions and confidences';

-- How two runs' predictions agree over every instance (the join): how many both get right,
-- only one gets right, both get wrong, and how many predictions agree.
-- Example: SELECT * FROM agreement('v1', 'v2')
CREATE MACRO agreement(a, b) AS TABLE
    SELECT count(*) AS instances,
           count(*) FILTER (WHERE x.prediction = y.prediction) AS same_prediction,
           avg((x.prediction = y.prediction)::INT) AS agreement,
           count(*) FILTER (WHERE x.correct AND y.correct) AS both_correct,
           count(*) FILTER (WHERE x.correct AND NOT y.correct) AS only_a_correct,
           count(*) FILTER (WHERE NOT x.correct AND y.correct) AS only_b_correct,
           count(*) FILTER (WHERE NOT x.correct AND NOT y.correct) AS both_wrong
    FROM query_table(_run_table(a, 'instances')) x JOIN query_table(_run_table(b, 'instances')) y USING (instance_id);
COMMENT ON MACRO TABLE agreement IS 'Two runs over the same instances: predictions agreeing, and who is right where (counts)';

-- Per instance, how alike two runs' maps for `method_name` are: the Spearman rank
-- correlation of their values (ties at their mean rank) and the share of the k largest
-- |values| they have in common. Rows of the same target rank; both targets shown (two models
-- may explain different predicted classes).
-- Example: SELECT avg(rank_correlation) FROM map_agreement('v1', 'v2', 'saliency') WHERE target_a = target_b
CREATE MACRO map_agreement(a, b, method_name, k := 10) AS TABLE
    SELECT x.instance_id, x.target_rank, x.target AS target_a, y.target AS target_b,
           rank_correlation(x.attribution, y.attribution) AS rank_correlation,
           top_k_overlap(x.attribution, y.attribution, k) AS top_k_overlap
    FROM query_table(_run_table(a, _attributions_view(method_name))) x
    JOIN query_table(_run_table(b, _attributions_view(method_name))) y USING (instance_id, target_rank);
COMMENT ON MACRO TABLE map_agreement IS 'Per instance, the rank correlation and top-k overlap of two runs'' maps for a method';

-- A subset's metrics in every run, in the runs' order (a model's versions or checkpoints):
-- size, accuracy, confusion counts and FairVis' rates for class `positive`.
-- Example: SELECT run, accuracy, fnr FROM subset_metrics_by_run('stroke = ''thin''')
-- A run where the subset is empty (a predicate on its predictions, say) has size 0.
CREATE MACRO subset_metrics_by_run(predicate, positive := 0) AS TABLE
    SELECT r.position, r.run, coalesce(m.size, 0) AS size, m.* EXCLUDE (run, size), unnest(_rates(tp, fp, fn, tn))
    FROM runs r
    LEFT JOIN query('SELECT run, ' || _confusion_columns(positive) || ', avg(confidence) AS mean_confidence '
                    || 'FROM instances_by_run WHERE label IS NOT NULL AND (' || predicate || ') GROUP BY run') m
        USING (run)
    ORDER BY r.position;
COMMENT ON MACRO TABLE subset_metrics_by_run IS 'The metrics of the subset where predicate holds, per run in the runs'' order';

-- How much a layer's representation changed between two runs over the same instances:
-- linear CKA (Kornblith et al. 2019; 1 = the same up to rotation and scale), and per neuron
-- of run a the neuron of run b that correlates most with it. Computed by storage/compare.py
-- over the joined activation vectors (centred), of every instance or about `sample` of them:
-- whole parts by a hash of their names when the runs were batched alike (a run group; only
-- those parts are read), else instances by a hash of their ids.
-- Example: SELECT * FROM representation_change('epoch_1', 'epoch_5', 'fc1')
-- (Each Python function is called once in a subquery: unnest(f(...), recursive := true)
-- would call it once per field of its result.)
CREATE MACRO representation_change(a, b, layer_name, sample := 0) AS TABLE
    SELECT c.* FROM (SELECT _representation_change(a, b, layer_name, sample) AS c);
COMMENT ON MACRO TABLE representation_change IS 'Linear CKA of a layer between two runs, over their common instances';
-- The same over every run in order: each against the next (the last against none), or each
-- against `reference` (the final checkpoint, say): when a layer settled during training.
-- Example: SELECT run, compared_with, linear_cka FROM representation_change_by_run('fc1')
CREATE MACRO representation_change_by_run(layer_name, reference := NULL, sample := 0) AS TABLE
    SELECT c.* FROM (SELECT unnest(_representation_change_by_run(layer_name, reference, sample)) AS c);
COMMENT ON MACRO TABLE representation_change_by_run IS 'Linear CKA of a layer between each run and the next (or a reference run), in the runs'' order';
CREATE MACRO neuron_matches(a, b, layer_name, sample := 0) AS TABLE
    SELECT c.* FROM (SELECT unnest(_neuron_matches(a, b, layer_name, sample)) AS c);
COMMENT ON MACRO TABLE neuron_matches IS 'Per neuron of run a, the most correlated neuron of run b in the same layer and the correlation';
