-- One method's long feature view (a tabular run): a row per instance, explained target and
-- feature (a column, or a categorical's one-hot columns as one). The features table lists
-- them in model order; the method's feature_attribution and the instance's feature_value
-- hold one entry per feature in that order. {view} and {attributions} are filled in with the
-- view's and the method's attributions view's names.
CREATE VIEW {view} AS
SELECT a.instance_id,
       a.target_rank,
       a.target,
       f.feature,
       f.kind,
       CASE WHEN f.kind = 'numeric' THEN i.feature_value[f.position + 1] END AS value,
       -- NaN where a categorical has no hot column (or several): no category, not an error
       CASE WHEN f.kind = 'categorical' AND NOT isnan(i.feature_value[f.position + 1])
            THEN f.categories[CAST(i.feature_value[f.position + 1] AS INTEGER) + 1] END AS category,
       a.feature_attribution[f.position + 1] AS attribution
FROM {attributions} AS a
JOIN instances AS i USING (instance_id)
CROSS JOIN features AS f;
