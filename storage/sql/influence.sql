-- TracIn's influence operators (pipeline/influence.py), created in a run's catalog when the
-- run computed its `influence` table: per explained instance, the training examples whose
-- loss gradients most agree (proponents, largest scores) and most disagree (opponents,
-- smallest scores) with its own, `k` of each.

-- An instance's proponents then opponents, strongest first: sign, rank, train_id, score.
CREATE MACRO influential_examples(id) AS TABLE
    SELECT sign, rank, train_id, score
    FROM influence
    WHERE instance_id = id
    ORDER BY sign DESC, rank;
COMMENT ON MACRO TABLE influential_examples IS 'An instance''s TracIn proponents then opponents, strongest first';

-- The training examples that are among the `top` proponents of the most instances where
-- `predicate` holds (the examples a subset leans on): train_id, instances, mean score.
CREATE MACRO top_proponents(predicate, top := 10) AS TABLE
    SELECT i.train_id, count(*) AS instances, avg(i.score) AS mean_score
    FROM influence i
    WHERE i.sign = 'proponent' AND i.rank <= top
      AND i.instance_id IN (SELECT unnest(subset_ids(predicate)))
    GROUP BY i.train_id
    ORDER BY instances DESC, mean_score DESC, i.train_id;
COMMENT ON MACRO TABLE top_proponents IS 'Training examples among the top proponents of the most instances where predicate holds';
