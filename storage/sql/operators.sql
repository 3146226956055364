-- Explanation operators over a run's views, loaded by storage/catalog.py:open_catalog.
-- Each is a table macro: SELECT * FROM <operator>(...). docs/sql.md has worked examples.

-- Confusion matrix: one row per (label, prediction) pair that occurs, with its count.
CREATE MACRO confusion_matrix() AS TABLE
    SELECT label, prediction, count(*) AS n
    FROM instances
    WHERE label IS NOT NULL
    GROUP BY ALL
    ORDER BY label, prediction;

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

-- Summary of the subset of instances where `predicate` (SQL over instances' columns, as
-- text) holds: size, accuracy, mean confidence, and label / prediction counts (MAPs).
-- Example: SELECT * FROM subset_summary('stroke = ''thin'' AND NOT correct')
CREATE MACRO subset_summary(predicate) AS TABLE
    FROM query(
        'SELECT count(*) AS size, avg(correct::INT) AS accuracy, avg(confidence) AS mean_confidence, '
        || 'histogram(label) AS label_counts, histogram(prediction) AS prediction_counts '
        || 'FROM instances WHERE ' || predicate
    );

-- Subgroup metrics (FairVis): one row per value combination of `columns` (text: one to
-- three instances columns, comma-separated), with size, accuracy, and one-vs-rest
-- FPR, FNR, precision and recall for class `positive`.
-- Example: SELECT * FROM subgroup_metrics('stroke', 8) ORDER BY recall
CREATE MACRO subgroup_metrics(columns, positive) AS TABLE
    FROM query(
        'SELECT ' || columns || ', count(*) AS size, avg(correct::INT) AS accuracy, '
        || 'count(*) FILTER (WHERE label = ' || positive || ' AND prediction = ' || positive || ') AS tp, '
        || 'count(*) FILTER (WHERE label <> ' || positive || ' AND prediction = ' || positive || ') AS fp, '
        || 'count(*) FILTER (WHERE label = ' || positive || ' AND prediction <> ' || positive || ') AS fn, '
        || 'count(*) FILTER (WHERE label <> ' || positive || ' AND prediction <> ' || positive || ') AS tn, '
        || 'fp / nullif(fp + tn, 0) AS fpr, fn / nullif(fn + tp, 0) AS fnr, '
        || 'tp / nullif(tp + fp, 0) AS precision, tp / nullif(tp + fn, 0) AS recall '
        || 'FROM instances WHERE label IS NOT NULL GROUP BY ALL ORDER BY ALL'
    );
