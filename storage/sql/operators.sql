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
