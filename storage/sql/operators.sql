-- Explanation operators: table macros stored in a run's catalog.duckdb by
-- storage/catalog.py:build_catalog. Use them as SELECT * FROM <operator>(...); they
-- compose like any table (join them, UNION ALL them, filter them).
-- docs/sql.md has a worked example of each. Names starting with "_" are building blocks.
--
-- Conventions: `layer_name` / `method_name` are names as in the job spec ('conv2');
-- `predicate` is SQL text over the instances view ('stroke = ''thin'' AND NOT correct');
-- `ids` is a LIST of instance ids; `columns` is a LIST of instances column names.
-- A layer's wide table has one FLOAT column per neuron, n0 .. n<d-1>: the
-- regular expression '^n\d+$' below selects exactly those (table order = neuron order).

-- Ids of the instances where `predicate` holds, as a LIST (feeds the *_ids operators).
CREATE MACRO subset_ids(predicate) AS
    (SELECT coalesce(list(instance_id), []) FROM query('SELECT instance_id FROM instances WHERE ' || predicate));
COMMENT ON MACRO subset_ids IS 'LIST of the ids of the instances where predicate (SQL text over instances) holds';

-- Per neuron of a layer, over the instances in `ids`: size, sum, sum of squares and the
-- count of active (> 0) values: the mergeable parts of a mean, a variance and a fraction.
-- One scan of the layer's wide table, every neuron at once.
CREATE MACRO _neuron_moments(layer_name, ids) AS TABLE
    WITH totals AS (
        SELECT count(*) AS size,
               sum(COLUMNS('^n\d+$')) AS 'sum_\0',
               sum(COLUMNS('^n\d+$')::DOUBLE * COLUMNS('^n\d+$')::DOUBLE) AS 'sq_\0',
               count_if(COLUMNS('^n\d+$') > 0 AND NOT isnan(COLUMNS('^n\d+$'))) AS 'act_\0'
        FROM query_table(_activations_view(layer_name))
        WHERE instance_id IN (SELECT unnest(ids))
    ), lists AS (
        SELECT size, list_value(*COLUMNS('^sum_')) AS sums, list_value(*COLUMNS('^sq_')) AS squares,
               list_value(*COLUMNS('^act_')) AS actives
        FROM totals
    )
    SELECT unnest(range(len(sums)))::INTEGER AS neuron, size,
           unnest(sums) AS total, unnest(squares) AS total_sq, unnest(actives) AS active
    FROM lists;

-- Mean, sample standard deviation and fraction active from mergeable parts.
CREATE MACRO _mean(total, size) AS total / nullif(size, 0);
CREATE MACRO _std(total, total_sq, size) AS
    sqrt(greatest(0, (total_sq - total * total / nullif(size, 0)) / nullif(size - 1, 0)));

-- Neuron activation matrix (ActiVis) of one subset given as a list of ids: one row per
-- neuron with the subset's size, mean activation, standard deviation and the fraction
-- of its instances where the neuron is active (> 0).
CREATE MACRO neuron_matrix_ids(layer_name, ids) AS TABLE
    SELECT neuron, size, _mean(total, size) AS mean, _std(total, total_sq, size) AS std,
           _mean(active, size) AS frac_active
    FROM _neuron_moments(layer_name, ids)
    ORDER BY neuron;
COMMENT ON MACRO TABLE neuron_matrix_ids IS 'Per neuron of a layer over a LIST of instance ids: size, mean, std, fraction active (> 0)';

-- The same for the subset where `predicate` holds.
CREATE MACRO neuron_matrix(layer_name, predicate) AS TABLE
    FROM neuron_matrix_ids(layer_name, subset_ids(predicate));
COMMENT ON MACRO TABLE neuron_matrix IS 'Per neuron of a layer over the instances where predicate holds: size, mean, std, fraction active';

-- The class subset a (label, prediction) cell belongs to, for the *_by operators:
-- `subsets` is 'label' (true classes), 'prediction' (predicted classes), 'correct'
-- (correct / incorrect) or 'cell' (each label → prediction pair); and the subset's class
-- (the label, or the predicted class; NULL for 'correct').
CREATE MACRO _class_subset(subsets, label, prediction) AS
    CASE subsets
        WHEN 'label' THEN 'label=' || label
        WHEN 'prediction' THEN 'prediction=' || prediction
        WHEN 'correct' THEN CASE WHEN label = prediction THEN 'correct' ELSE 'incorrect' END
        WHEN 'cell' THEN 'label=' || label || ' prediction=' || prediction
        ELSE error('subsets must be ''label'', ''prediction'', ''correct'' or ''cell'', got ''' || subsets || '''')
    END;
CREATE MACRO _class_subset_class(subsets, label, prediction) AS
    CASE subsets WHEN 'label' THEN label WHEN 'prediction' THEN prediction WHEN 'cell' THEN label END;

-- Neuron activation matrix for class subsets, from the statistics precomputed per
-- (label, prediction) cell when the catalog was built (no scan of the activations).
-- `subsets` as in _class_subset; instances without a label count only for 'prediction'.
CREATE MACRO neuron_matrix_by(layer_name, subsets := 'label') AS TABLE
    WITH keyed AS (
        SELECT _class_subset(subsets, label, prediction) AS subset,
               _class_subset_class(subsets, label, prediction) AS class,
               CASE subsets WHEN 'cell' THEN prediction END AS cell_prediction,
               neuron, size, total, total_sq, active
        FROM neuron_cells
        WHERE layer = layer_name AND (subsets = 'prediction' OR label IS NOT NULL)
    )
    SELECT subset, class, neuron, sum(size)::BIGINT AS size, _mean(sum(total), sum(size)) AS mean,
           _std(sum(total), sum(total_sq), sum(size)) AS std, _mean(sum(active), sum(size)) AS frac_active
    FROM keyed
    GROUP BY subset, class, cell_prediction, neuron
    ORDER BY class, cell_prediction, subset, neuron;
COMMENT ON MACRO TABLE neuron_matrix_by IS 'Neuron matrix for class subsets (subsets: label, prediction, correct, cell) from precomputed sums, no scan';

-- Two subsets compared (ActiVis's comparison, i-Algebra's comparative analysis): per
-- neuron the means of A and B, their difference (A - B) and Cohen's d (the difference
-- over the pooled standard deviation), largest |d| first.
CREATE MACRO compare_subsets_ids(layer_name, ids_a, ids_b) AS TABLE
    SELECT a.neuron, a.size AS size_a, b.size AS size_b,
           _mean(a.total, a.size) AS mean_a, _mean(b.total, b.size) AS mean_b,
           mean_a - mean_b AS difference,
           difference / nullif(sqrt(
               ((a.size - 1) * _std(a.total, a.total_sq, a.size) ** 2
                + (b.size - 1) * _std(b.total, b.total_sq, b.size) ** 2)
               / nullif(a.size + b.size - 2, 0)), 0) AS effect_size,
           _mean(a.active, a.size) AS frac_active_a, _mean(b.active, b.size) AS frac_active_b
    FROM _neuron_moments(layer_name, ids_a) AS a JOIN _neuron_moments(layer_name, ids_b) AS b USING (neuron)
    ORDER BY abs(effect_size) DESC NULLS LAST, abs(difference) DESC, neuron;
COMMENT ON MACRO TABLE compare_subsets_ids IS 'Two subsets (LISTs of ids) compared per neuron: means, difference, Cohen''s d; largest |d| first';

CREATE MACRO compare_subsets(layer_name, predicate_a, predicate_b) AS TABLE
    FROM compare_subsets_ids(layer_name, subset_ids(predicate_a), subset_ids(predicate_b));
COMMENT ON MACRO TABLE compare_subsets IS 'Two subsets (predicates) compared per neuron: means, difference, Cohen''s d; largest |d| first';

-- Exemplars: the k instances that activate one neuron most, highest first (NaN above every
-- number, ties by id). Up to _neuron_top_kept() they come from neuron_top, which the
-- workers' per-part top lists fill; a larger k scans the layer.
CREATE MACRO _top_instances_scan(layer_name, neuron, k) AS TABLE
    SELECT row_number() OVER (ORDER BY activation DESC, instance_id) AS rank, instance_id, activation
    FROM (SELECT instance_id, COLUMNS('^n' || neuron || '$') AS activation
          FROM query_table(_activations_view(layer_name)))
    ORDER BY rank
    LIMIT k;

CREATE MACRO top_instances(layer_name, neuron, k := 10) AS TABLE
    FROM query(CASE WHEN k <= _neuron_top_kept()
        THEN 'SELECT rank, instance_id, activation FROM neuron_top WHERE layer = ' || _literal(layer_name)
             || ' AND neuron = ' || neuron::INTEGER || ' AND rank <= ' || k::BIGINT || ' ORDER BY rank'
        ELSE 'FROM _top_instances_scan(' || _literal(layer_name) || ', ' || neuron::INTEGER || ', ' || k::BIGINT || ')'
    END);
COMMENT ON MACRO TABLE top_instances IS 'The k instances that activate one neuron most (exemplars)';

-- Exemplars of every neuron of a layer: (neuron, rank, instance_id, activation).
CREATE MACRO _neuron_exemplars_scan(layer_name, k) AS TABLE
    WITH tops AS (
        SELECT max_by(instance_id, COLUMNS('^n\d+$'), k) AS 'ids_\0', max(COLUMNS('^n\d+$'), k) AS 'values_\0'
        FROM query_table(_activations_view(layer_name))
    ), per_neuron AS (
        SELECT unnest(range(len(ids)))::INTEGER AS neuron, unnest(ids) AS ids, unnest(vals) AS vals
        FROM (SELECT list_value(*COLUMNS('^ids_')) AS ids, list_value(*COLUMNS('^values_')) AS vals FROM tops)
    )
    SELECT neuron, unnest(range(1, len(ids) + 1)) AS rank, unnest(ids) AS instance_id, unnest(vals) AS activation
    FROM per_neuron
    ORDER BY neuron, rank;

CREATE MACRO neuron_exemplars(layer_name, k := 5) AS TABLE
    FROM query(CASE WHEN k <= _neuron_top_kept()
        THEN 'SELECT neuron, rank, instance_id, activation FROM neuron_top WHERE layer = ' || _literal(layer_name)
             || ' AND rank <= ' || k::BIGINT || ' ORDER BY neuron, rank'
        ELSE 'FROM _neuron_exemplars_scan(' || _literal(layer_name) || ', ' || k::BIGINT || ')'
    END);
COMMENT ON MACRO TABLE neuron_exemplars IS 'The k top instances of every neuron of a layer';

-- One instance's activations of a layer, one row per neuron (fast.sql serves it from the
-- activation index; this pure-SQL form scans the layer for the id).
CREATE MACRO _instance_activations(layer_name, instance) AS TABLE
    SELECT unnest(range(len(v)))::INTEGER AS neuron, unnest(v) AS activation
    FROM (SELECT list_value(*COLUMNS('^n\d+$')) AS v
          FROM query_table(_activations_view(layer_name)) WHERE instance_id = instance);

-- The k neurons of a layer most active for one instance, highest first.
CREATE MACRO top_neurons(layer_name, instance, k := 10) AS TABLE
    SELECT neuron, activation
    FROM _instance_activations(layer_name, instance)
    ORDER BY activation DESC, neuron
    LIMIT k;
COMMENT ON MACRO TABLE top_neurons IS 'The k most active neurons of a layer for one instance';

-- Confusion matrix: one row per (label, prediction) pair that occurs, with its count.
CREATE MACRO confusion_matrix() AS TABLE
    SELECT label, prediction, count(*) AS n
    FROM instances
    WHERE label IS NOT NULL
    GROUP BY ALL
    ORDER BY label, prediction;
COMMENT ON MACRO TABLE confusion_matrix IS 'Counts per (label, prediction)';

-- Per-class precision, recall and support (classes that occur as label or prediction).
-- precision is NULL for a class never predicted; recall is NULL for a class never labeled.
CREATE MACRO class_metrics() AS TABLE
    WITH labeled AS (SELECT label, prediction FROM instances WHERE label IS NOT NULL),
    classes AS (SELECT label AS class FROM labeled UNION SELECT prediction FROM labeled)
    SELECT
        class,
        count(*) FILTER (WHERE l.label = class) AS support,
        count(*) FILTER (WHERE l.prediction = class) AS predicted,
        count(*) FILTER (WHERE l.label = class AND l.prediction = class) AS true_positives,
        true_positives / nullif(predicted, 0) AS precision,
        true_positives / nullif(support, 0) AS recall
    FROM classes CROSS JOIN labeled AS l
    GROUP BY class
    ORDER BY class;
COMMENT ON MACRO TABLE class_metrics IS 'Per class: support, predicted, true positives, precision, recall';

-- Summary of the subset of instances where `predicate` holds: size, accuracy, mean
-- confidence, and label / prediction counts (MAPs class → count).
CREATE MACRO subset_summary(predicate) AS TABLE
    FROM query(
        'SELECT count(*) AS size, avg(correct::INT) AS accuracy, avg(confidence) AS mean_confidence, '
        || 'histogram(label) AS label_counts, histogram(prediction) AS prediction_counts '
        || 'FROM instances WHERE ' || predicate
    );
COMMENT ON MACRO TABLE subset_summary IS 'Size, accuracy, mean confidence, label and prediction counts of the subset where predicate holds';

-- The metrics of the labeled instances where `predicate` holds (FairVis' side-by-side view).
-- Example: SELECT * FROM subset_metrics('stroke = ''thin''', 8)
CREATE MACRO subset_metrics(predicate, positive := 0) AS TABLE
    SELECT *, unnest(_rates(tp, fp, fn, tn))
    FROM query('SELECT ' || _confusion_columns(positive) || ', avg(confidence) AS mean_confidence '
               || 'FROM instances WHERE label IS NOT NULL AND (' || predicate || ')');
COMMENT ON MACRO TABLE subset_metrics IS 'Size, accuracy, confusion counts, FPR, FNR, precision, recall (for class positive) and mean confidence of the labeled subset where predicate holds';

-- Slices of an instances column, for subgroups.
-- A column to slice into subgroups is named, optionally with how: `column` (each value its
-- own subgroup when it has at most 12; else a number in 5 quantile bins, a text in its 11 most
-- frequent values and "other"), `column:N` (N quantile bins; a text: its N - 1 most frequent
-- values and "other") or `column:a,b,c` (bins between the cut points a < b < c).
CREATE MACRO _slice_values() AS 12;
CREATE MACRO _slice_quantiles() AS 5;
CREATE MACRO _slice_name(spec) AS CASE WHEN contains(spec, ':') THEN spec[:strpos(spec, ':') - 1] ELSE spec END;
CREATE MACRO _slice_option(spec) AS CASE WHEN contains(spec, ':') THEN spec[strpos(spec, ':') + 1:] ELSE '' END;
CREATE MACRO _slice_count(spec) AS
    CASE WHEN _slice_option(spec) = '' THEN 0 WHEN contains(_slice_option(spec), ',') THEN 0
         ELSE CAST(_slice_option(spec) AS INTEGER) END;
-- The SQL text of the one-row statistics of slice `i` (how many values, whether they are all
-- numbers, the cut points, the most frequent values) over the labeled instances.
CREATE MACRO _slice_stats_sql(spec, i) AS
    's' || i || ' AS (SELECT count(DISTINCT ' || _quoted(_slice_name(spec)) || ') AS distinct_values, '
    || 'count(TRY_CAST(' || _quoted(_slice_name(spec)) || ' AS DOUBLE)) = count(' || _quoted(_slice_name(spec)) || ') AS numeric, '
    || CASE WHEN contains(_slice_option(spec), ',') THEN 'list_sort(list_distinct([' || _slice_option(spec) || ']::DOUBLE[]))'
            ELSE 'list_sort(list_distinct(quantile_cont(TRY_CAST(' || _quoted(_slice_name(spec)) || ' AS DOUBLE), '
                 || 'list_transform(range(1, ' || coalesce(nullif(_slice_count(spec), 0), _slice_quantiles())
                 || '), lambda k: k / ' || coalesce(nullif(_slice_count(spec), 0), _slice_quantiles()) || '))))' END
    || ' AS cuts, (SELECT coalesce(list(v ORDER BY n DESC, v), []) FROM (SELECT ' || _quoted(_slice_name(spec)) || '::VARCHAR AS v, '
    || 'count(*) AS n FROM instances WHERE label IS NOT NULL AND ' || _quoted(_slice_name(spec)) || ' IS NOT NULL '
    || 'GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ' || (coalesce(nullif(_slice_count(spec), 0), _slice_values()) - 1) || ')) AS tops, '
    || CASE WHEN contains(_slice_option(spec), ',') THEN '''bins''' WHEN _slice_count(spec) > 0 THEN '''chosen''' ELSE '''auto''' END
    || ' AS asked FROM instances WHERE label IS NOT NULL)';
-- How slice `i`'s values are grouped: 'values' (each its own), 'bins' (between cut points) or
-- 'top' (the most frequent, and "other").
CREATE MACRO _slicing(asked, distinct_values, numeric, count) AS
    CASE WHEN asked = 'bins' THEN 'bins'
         WHEN distinct_values <= CASE asked WHEN 'auto' THEN _slice_values() ELSE count END THEN 'values'
         WHEN numeric THEN 'bins' ELSE 'top' END;
-- The SQL text of slice `i`'s _slicing, from its statistics s<i>.
CREATE MACRO _slicing_sql(spec, i) AS
    '_slicing(s' || i || '.asked, s' || i || '.distinct_values, s' || i || '.numeric, ' || _slice_count(spec) || ')';
CREATE MACRO _bin(v, cuts) AS len(list_filter(cuts, lambda c: c <= TRY_CAST(v AS DOUBLE)));
CREATE MACRO _short(x) AS printf('%.4g', x);
-- Value `v`'s slice, as shown: the value, "other", or its bin with its edges.
CREATE MACRO _slice_label(v, slicing, cuts, tops) AS
    CASE WHEN v IS NULL THEN NULL
         WHEN slicing = 'values' THEN v::VARCHAR
         WHEN slicing = 'top' THEN CASE WHEN list_contains(tops, v::VARCHAR) THEN v::VARCHAR ELSE 'other' END
         WHEN len(cuts) = 0 THEN 'any'
         WHEN _bin(v, cuts) = 0 THEN '< ' || _short(cuts[1])
         WHEN _bin(v, cuts) = len(cuts) THEN '>= ' || _short(cuts[-1])
         ELSE '[' || _short(cuts[_bin(v, cuts)]) || ', ' || _short(cuts[_bin(v, cuts) + 1]) || ')' END;
-- The SQL predicate over instances of value `v`'s slice of column `name` (exact edges).
CREATE MACRO _slice_predicate(name, v, slicing, cuts, tops) AS
    CASE WHEN v IS NULL THEN _quoted(name) || ' IS NULL'
         WHEN slicing = 'values' OR (slicing = 'top' AND list_contains(tops, v::VARCHAR))
             THEN _quoted(name) || ' = ' || _literal(v::VARCHAR)
         WHEN slicing = 'top'
             THEN _quoted(name) || '::VARCHAR NOT IN (' || array_to_string(list_transform(tops, lambda t: _literal(t)), ', ') || ')'
         WHEN len(cuts) = 0 THEN _quoted(name) || ' IS NOT NULL'
         WHEN _bin(v, cuts) = 0 THEN _quoted(name) || ' < ' || cuts[1]::VARCHAR
         WHEN _bin(v, cuts) = len(cuts) THEN _quoted(name) || ' >= ' || cuts[-1]::VARCHAR
         ELSE _quoted(name) || ' >= ' || cuts[_bin(v, cuts)]::VARCHAR || ' AND '
              || _quoted(name) || ' < ' || cuts[_bin(v, cuts) + 1]::VARCHAR END;
-- A slice as a subgroup's name shows it: `stroke=thin`, `rotation in [18.01, 36.04)`, `rotation < 18.01`.
CREATE MACRO _slice_text(name, label) AS
    name || CASE WHEN label IS NULL THEN '=NULL' WHEN label[1] = '[' THEN ' in ' || label
                 WHEN label[1] IN ('<', '>') THEN ' ' || label ELSE '=' || label END;

-- Subgroups (FairVis) of the labeled instances: every slice combination of every subset of
-- `columns` (one to three instances columns, as a LIST, each sliced as above), i.e. each
-- column alone, their intersections, and (level 0) all labeled instances. Per subgroup: each
-- column's slice (NULL where the subgroup does not fix it), a readable `subgroup`, its
-- `predicate` over instances (exact edges: it selects the subgroup's instances), `level`
-- (how many columns it fixes) and the metrics above for class `positive`.
CREATE MACRO _subgroup_cube(columns, positive) AS TABLE
    SELECT *, unnest(_rates(tp, fp, fn, tn))
    FROM query(
        'WITH ' || array_to_string(list_transform(columns, lambda c, i: _slice_stats_sql(c, i)), ', ')
        || ', sliced AS (SELECT i.*, '
        || array_to_string(list_transform(columns, lambda c, i:
               '_slice_label(i.' || _quoted(_slice_name(c)) || ', ' || _slicing_sql(c, i) || ', s' || i || '.cuts, s' || i
               || '.tops) AS "slice ' || i || '"'), ', ')
        || ' FROM instances AS i, ' || array_to_string(list_transform(columns, lambda c, i: 's' || i), ', ')
        || ' WHERE i.label IS NOT NULL), cube AS (SELECT '
        || array_to_string(list_transform(columns, lambda c, i: '"slice ' || i || '", grouping("slice ' || i || '") AS "fixed '
               || i || '", any_value(' || _quoted(_slice_name(c)) || ') AS "value ' || i || '"'), ', ') || ', '
        || '(' || array_to_string(list_transform(columns, lambda c, i: '(1 - grouping("slice ' || i || '"))'), ' + ')
        || ')::INTEGER AS level, ' || _confusion_columns(positive) || ' '
        || 'FROM sliced GROUP BY CUBE ('
        || array_to_string(list_transform(columns, lambda c, i: '"slice ' || i || '"'), ', ') || ')) '
        -- The names and predicates per subgroup, not per instance (a predicate is built from
        -- any of its instances' values: they all fall in the same slice).
        || 'SELECT ' || array_to_string(list_transform(columns, lambda c, i: '"slice ' || i || '" AS ' || _quoted(_slice_name(c))), ', ')
        || ', concat_ws('' AND '', ' || array_to_string(list_transform(columns, lambda c, i:
               'CASE WHEN "fixed ' || i || '" = 0 THEN _slice_text(' || _literal(_slice_name(c)) || ', "slice ' || i || '") END'), ', ')
        || ') AS subgroup, concat_ws('' AND '', ' || array_to_string(list_transform(columns, lambda c, i:
               'CASE WHEN "fixed ' || i || '" = 0 THEN _slice_predicate(' || _literal(_slice_name(c)) || ', "value ' || i || '", '
               || _slicing_sql(c, i) || ', s' || i || '.cuts, s' || i || '.tops) END'), ', ')
        || ') AS predicate, level, size, accuracy, tp, fp, fn, tn FROM cube, '
        || array_to_string(list_transform(columns, lambda c, i: 's' || i), ', ')
    )
    WHERE CASE WHEN len(columns) BETWEEN 1 AND 3 THEN true
               ELSE error('subgroups take one to three columns, got ' || len(columns) || ': ' || columns::VARCHAR) END;

-- Subgroup metrics over `columns` and their intersections, most specific first.
-- Example: SELECT * FROM subgroup_metrics(['stroke'], 8) ORDER BY recall
CREATE MACRO subgroup_metrics(columns, positive) AS TABLE
    FROM _subgroup_cube(columns, positive)
    WHERE level > 0
    ORDER BY level DESC, subgroup;
COMMENT ON MACRO TABLE subgroup_metrics IS 'FairVis subgroups of 1-3 columns and their intersections: size, accuracy, FPR, FNR, precision, recall for class positive';

-- The worst subgroups by `metric` (accuracy, fpr, fnr, precision or recall for class
-- `positive`) among those with at least `min_size` instances, as FairVis suggests them.
-- A sliceline-like search: every subgroup of up to three columns is scored; `gap` is how
-- much worse than all labeled instances (the cube's level 0) it is (positive = worse),
-- and ties go to the larger subgroup.
CREATE MACRO suggested_subgroups(columns, metric := 'accuracy', positive := 0, min_size := 30, k := 10) AS TABLE
    WITH scored AS (
        SELECT *, _metric(metric, accuracy, fpr, fnr, precision, recall) AS value
        FROM _subgroup_cube(columns, positive)
    ), beside_overall AS (
        -- The level-0 row's value beside every row: one pass over the cube, not a second.
        SELECT *, max(value) FILTER (WHERE level = 0) OVER () AS overall FROM scored
    )
    SELECT subgroup, predicate, level, size, metric AS metric, value, overall,
           CASE WHEN metric IN ('fpr', 'fnr') THEN value - overall ELSE overall - value END AS gap,
           accuracy, fpr, fnr, precision, recall
    FROM beside_overall
    WHERE level > 0 AND size >= min_size AND value IS NOT NULL
    ORDER BY gap DESC, size DESC, subgroup
    LIMIT k;
COMMENT ON MACRO TABLE suggested_subgroups IS 'The k worst subgroups by metric with at least min_size instances (sliceline-like)';

-- Mean attribution maps per class subset, from the per-(label, prediction) sums computed
-- when the catalog was built: one row per subset with `mean_abs` (mean absolute
-- attribution per stored position, the usual "where does the model look") and `mean`
-- (signed), both flat lists in the order of the method's stored_shape (see `methods`).
-- `subsets` as in neuron_matrix_by; `target_rank` 0 is the first explained target.
CREATE MACRO attribution_map_by(method_name, subsets := 'label', rank := 0) AS TABLE
    WITH keyed AS (
        SELECT _class_subset(subsets, label, prediction) AS subset,
               _class_subset_class(subsets, label, prediction) AS class,
               CASE subsets WHEN 'cell' THEN prediction END AS cell_prediction,
               position, size, total, total_abs
        FROM attribution_cells
        WHERE method = method_name AND target_rank = rank AND (subsets = 'prediction' OR label IS NOT NULL)
    ), per_position AS (
        SELECT subset, class, cell_prediction, position, sum(size)::BIGINT AS size,
               sum(total_abs) / sum(size) AS mean_abs, sum(total) / sum(size) AS mean
        FROM keyed GROUP BY ALL
    )
    SELECT subset, class, any_value(size) AS size,
           list(mean_abs ORDER BY position) AS mean_abs, list(mean ORDER BY position) AS mean
    FROM per_position
    GROUP BY subset, class, cell_prediction
    ORDER BY class, cell_prediction, subset;
COMMENT ON MACRO TABLE attribution_map_by IS 'Mean |attribution| and mean attribution maps per class subset, from precomputed sums';

-- Mean attribution map of the subset where `predicate` holds (scans the stored maps).
CREATE MACRO attribution_map(method_name, predicate, rank := 0) AS TABLE
    WITH chosen AS (
        SELECT attribution FROM query_table(_attributions_view(method_name))
        WHERE target_rank = rank AND instance_id IN (SELECT unnest(subset_ids(predicate)))
    ), flat AS (
        SELECT unnest(range(len(attribution))) AS position, unnest(attribution) AS value FROM chosen
    ), per_position AS (
        SELECT position, avg(abs(value)) AS mean_abs, avg(value) AS mean FROM flat GROUP BY position
    )
    SELECT (SELECT count(*) FROM chosen) AS size,
           list(mean_abs ORDER BY position) AS mean_abs, list(mean ORDER BY position) AS mean
    FROM per_position;
COMMENT ON MACRO TABLE attribution_map IS 'Mean |attribution| and mean attribution map of the subset where predicate holds';

-- ---------------------------------------------------------------------------------------
-- Tokens (a text run): each method's long token view token_attributions_<method> has a row
-- per instance, target rank and own token (docs/sql.md).

CREATE MACRO _token_attributions_view(method_name) AS
    'token_attributions_' || regexp_replace(method_name, '\W', '_', 'g');

-- Per token, over the instances where `predicate` holds: how often it occurs (tokens and
-- instances) and its total, mean and mean absolute value; tokens seen fewer than
-- `min_count` times are left out (a rare token's mean says little). Most positive first:
-- the tokens that push most toward the explained class in that subset.
CREATE MACRO top_tokens(method_name, predicate := 'true', min_count := 1, rank := 0) AS TABLE
    SELECT token,
           count(*) AS occurrences,
           count(DISTINCT instance_id) AS instances,
           sum(value) AS total,
           avg(value) AS mean,
           avg(abs(value)) AS mean_abs
    FROM query_table(_token_attributions_view(method_name))
    WHERE target_rank = rank
      AND instance_id IN (SELECT instance_id FROM query('SELECT instance_id FROM instances WHERE ' || predicate))
    GROUP BY token
    HAVING count(*) >= min_count
    ORDER BY mean DESC, token;
COMMENT ON MACRO TABLE top_tokens IS 'Per token over the subset where predicate holds: occurrences, instances, total, mean and mean |value| of its attribution (at least min_count occurrences), most positive first';

-- The tokens whose mean value differs most between subset A and subset B (e.g. the
-- mistakes and the rest): each seen at least `min_count` times in both.
CREATE MACRO token_difference(method_name, predicate_a, predicate_b, min_count := 1, rank := 0) AS TABLE
    WITH a AS (SELECT token, occurrences, mean FROM top_tokens(method_name, predicate_a, min_count, rank)),
         b AS (SELECT token, occurrences, mean FROM top_tokens(method_name, predicate_b, min_count, rank))
    SELECT token, a.occurrences AS occurrences_a, b.occurrences AS occurrences_b,
           a.mean AS mean_a, b.mean AS mean_b, a.mean - b.mean AS difference
    FROM a JOIN b USING (token)
    ORDER BY abs(a.mean - b.mean) DESC, token;
COMMENT ON MACRO TABLE token_difference IS 'Tokens whose mean attribution differs most between the subsets where predicate_a and predicate_b hold (at least min_count occurrences in each)';

-- The instances whose tokens include `token` (as the tokenizer wrote it: "##s" for a
-- word piece), with the positions where it occurs. (`tokens_table` is a parameter so that the
-- macro binds where a run has no tokens table.)
CREATE MACRO instances_with_token(token_text, tokens_table := 'tokens') AS TABLE
    SELECT instance_id, list(position ORDER BY position) AS positions, count(*) AS occurrences
    FROM (SELECT instance_id, unnest(tokens) AS token, unnest(range(length)) AS position FROM query_table(tokens_table))
    WHERE token = token_text
    GROUP BY instance_id
    ORDER BY instance_id;
COMMENT ON MACRO TABLE instances_with_token IS 'Instances of a text run whose tokens include token_text, with its positions';

-- top_tokens for class subsets from the per-token sums precomputed per (label, prediction)
-- cell (no token read: any run size). `subsets` as in _class_subset.
CREATE MACRO top_tokens_by(method_name, subsets := 'prediction', min_count := 1, rank := 0) AS TABLE
    WITH keyed AS (
        SELECT _class_subset(subsets, label, prediction) AS subset,
               _class_subset_class(subsets, label, prediction) AS class,
               CASE subsets WHEN 'cell' THEN prediction END AS cell_prediction,
               token, occurrences, instances, total, total_abs
        FROM token_cells
        WHERE method = method_name AND target_rank = rank AND (subsets = 'prediction' OR label IS NOT NULL)
    )
    SELECT subset, class, token, sum(occurrences)::BIGINT AS occurrences, sum(instances)::BIGINT AS instances,
           sum(total) AS total, sum(total) / sum(occurrences) AS mean, sum(total_abs) / sum(occurrences) AS mean_abs
    FROM keyed
    GROUP BY subset, class, cell_prediction, token
    HAVING sum(occurrences) >= min_count
    ORDER BY class, cell_prediction, subset, mean DESC, token;
COMMENT ON MACRO TABLE top_tokens_by IS 'Per class subset (subsets: label, prediction, correct, cell) and token: occurrences, instances, total, mean and mean |value| of its attribution, from precomputed sums (no scan), most positive first';

-- ---------------------------------------------------------------------------------------
-- Features (a tabular run): each method's long feature view feature_attributions_<method>
-- has a row per instance, target rank and feature, a categorical's one-hot columns being one
-- feature (docs/sql.md). `features_table` is a parameter so that the macros bind where a run
-- has no features.

CREATE MACRO _feature_attributions_view(method_name) AS
    'feature_attributions_' || regexp_replace(method_name, '\W', '_', 'g');

-- Global importance over the instances where `predicate` holds: per feature the mean
-- absolute attribution (how far it moves the explained output, either way), the mean
-- (which way, on balance) and the instances; most important first.
CREATE MACRO feature_importance(method_name, predicate := 'true', rank := 0) AS TABLE
    SELECT feature, count(*) AS instances, avg(abs(attribution)) AS mean_abs, avg(attribution) AS mean
    FROM query_table(_feature_attributions_view(method_name))
    WHERE target_rank = rank
      AND instance_id IN (SELECT instance_id FROM query('SELECT instance_id FROM instances WHERE ' || predicate))
    GROUP BY feature
    ORDER BY mean_abs DESC, feature;
COMMENT ON MACRO TABLE feature_importance IS 'Per feature over the subset where predicate holds: instances, mean |attribution| and mean attribution, most important first';

-- The same per class subset (`subsets` as in _class_subset).
CREATE MACRO feature_importance_by(method_name, subsets := 'prediction', rank := 0) AS TABLE
    SELECT _class_subset(subsets, i.label, i.prediction) AS subset,
           _class_subset_class(subsets, i.label, i.prediction) AS class,
           v.feature, count(*) AS instances, avg(abs(v.attribution)) AS mean_abs, avg(v.attribution) AS mean
    FROM query_table(_feature_attributions_view(method_name)) AS v
    JOIN instances AS i USING (instance_id)
    WHERE v.target_rank = rank AND (subsets = 'prediction' OR i.label IS NOT NULL)
    GROUP BY ALL
    ORDER BY class, subset, mean_abs DESC, feature;
COMMENT ON MACRO TABLE feature_importance_by IS 'Per class subset (subsets: label, prediction, correct, cell) and feature: instances, mean |attribution| and mean attribution, most important first';

-- The features whose importance differs most between subset A and subset B (women and men;
-- one subgroup's false positives and the rest): mean |attribution| and mean in each, and
-- the difference of the mean |attribution| (A - B), largest first.
CREATE MACRO feature_importance_difference(method_name, predicate_a, predicate_b, rank := 0) AS TABLE
    WITH a AS (SELECT * FROM feature_importance(method_name, predicate_a, rank)),
         b AS (SELECT * FROM feature_importance(method_name, predicate_b, rank))
    SELECT feature, a.instances AS instances_a, b.instances AS instances_b,
           a.mean_abs AS mean_abs_a, b.mean_abs AS mean_abs_b, a.mean_abs - b.mean_abs AS difference,
           a.mean AS mean_a, b.mean AS mean_b
    FROM a JOIN b USING (feature)
    ORDER BY abs(a.mean_abs - b.mean_abs) DESC, feature;
COMMENT ON MACRO TABLE feature_importance_difference IS 'Features whose mean |attribution| differs most between the subsets where predicate_a and predicate_b hold';

-- Dependence data for one feature: per instance where `predicate` holds, the feature's
-- value (a number; or the category of a categorical) and its attribution, at most `k`
-- instances (a seeded sample when there are more: the same rows every time).
CREATE MACRO feature_dependence(method_name, feature_name, predicate := 'true', k := 100000, rank := 0) AS TABLE
    SELECT instance_id, value, category, attribution
    FROM query_table(_feature_attributions_view(method_name))
    WHERE target_rank = rank AND feature = feature_name
      AND instance_id IN (SELECT instance_id FROM query('SELECT instance_id FROM instances WHERE ' || predicate))
    ORDER BY hash(instance_id), instance_id
    LIMIT k;
COMMENT ON MACRO TABLE feature_dependence IS 'One feature''s value (or category) and attribution per instance where predicate holds, at most k (a fixed sample)';
