-- One method's long token view: a row per instance, explained target and own token (the
-- tokens table's lists and the method's token_attribution list have one entry per own
-- token, in order, so unnesting them side by side pairs them). {view} and {attributions}
-- are filled in with the view's and the method's attributions view's names.
CREATE VIEW {view} AS
SELECT a.instance_id,
       a.target_rank,
       a.target,
       unnest(range(t.length)) AS position,
       unnest(t.tokens) AS token,
       unnest(t.token_ids) AS token_id,
       unnest(t.token_start) AS token_start,
       unnest(t.token_end) AS token_end,
       unnest(a.token_attribution) AS value
FROM {attributions} AS a
JOIN tokens AS t USING (instance_id);
