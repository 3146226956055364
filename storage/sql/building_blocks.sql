-- Building blocks of no table, loaded before operators.sql (a run's catalog) and before
-- compare.sql (several runs together, storage/compare.py): view names, quoting, and FairVis'
-- metric formulas, defined once.

-- The view of a layer or method name, by the rule of storage/catalog.py:sql_identifier.
CREATE MACRO _activations_view(layer_name) AS 'activations_' || regexp_replace(layer_name, '\W', '_', 'g');
CREATE MACRO _attributions_view(method_name) AS 'attributions_' || regexp_replace(method_name, '\W', '_', 'g');

-- A name as a quoted SQL identifier, and a text as a SQL string literal.
CREATE MACRO _quoted(name) AS '"' || replace(name, '"', '""') || '"';
CREATE MACRO _literal(text) AS '''' || replace(text, '''', '''''') || '''';

-- FairVis' metrics of a subset, defined here only (subgroups, suggested subgroups,
-- subset_metrics and the dashboard all use them). `_confusion_columns(positive)` is the SQL
-- text of a subset's size, accuracy and one-vs-rest confusion counts for class `positive`
-- (for query()); `_rates` turns the counts into FPR, FNR, precision and recall (NULL where
-- undefined); `_metric` picks one of the five by name.
CREATE MACRO _confusion_columns(positive) AS
    'count(*) AS size, avg(correct::INT) AS accuracy, '
    || 'count(*) FILTER (WHERE label = ' || CAST(positive AS BIGINT) || ' AND prediction = ' || CAST(positive AS BIGINT) || ') AS tp, '
    || 'count(*) FILTER (WHERE label <> ' || CAST(positive AS BIGINT) || ' AND prediction = ' || CAST(positive AS BIGINT) || ') AS fp, '
    || 'count(*) FILTER (WHERE label = ' || CAST(positive AS BIGINT) || ' AND prediction <> ' || CAST(positive AS BIGINT) || ') AS fn, '
    || 'count(*) FILTER (WHERE label <> ' || CAST(positive AS BIGINT) || ' AND prediction <> ' || CAST(positive AS BIGINT) || ') AS tn';
CREATE MACRO _rates(tp, fp, fn, tn) AS {
    'fpr': fp / nullif(fp + tn, 0), 'fnr': fn / nullif(fn + tp, 0),
    'precision': tp / nullif(tp + fp, 0), 'recall': tp / nullif(tp + fn, 0)};
CREATE MACRO _metric(metric, accuracy, fpr, fnr, precision, recall) AS
    CASE metric WHEN 'accuracy' THEN accuracy WHEN 'fpr' THEN fpr WHEN 'fnr' THEN fnr
                WHEN 'precision' THEN precision WHEN 'recall' THEN recall
                ELSE error('metric must be accuracy, fpr, fnr, precision or recall, got ''' || metric || '''') END;
