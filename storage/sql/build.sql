-- Built once per run by storage/catalog.py:build_catalog, after the per-layer and
-- per-method tables exist. Temporary macros are build helpers and are not kept.

-- Per (label, prediction) cell and neuron of one layer: the mergeable parts of the
-- statistics that neuron_matrix_by and the neurons view serve without a scan.
CREATE TEMP MACRO _neuron_cells_of(layer_name) AS TABLE
    WITH totals AS (
        SELECT i.label, i.prediction, count(*) AS size,
               sum(COLUMNS('^n\d+$')) AS 'sum_\0',
               sum(COLUMNS('^n\d+$')::DOUBLE * COLUMNS('^n\d+$')::DOUBLE) AS 'sq_\0',
               count_if(COLUMNS('^n\d+$') > 0 AND NOT isnan(COLUMNS('^n\d+$'))) AS 'act_\0',
               min(COLUMNS('^n\d+$')) AS 'min_\0',
               max(COLUMNS('^n\d+$')) AS 'max_\0'
        FROM query_table(_activations_view(layer_name))
             JOIN (SELECT instance_id, label, prediction FROM instances) AS i USING (instance_id)
        GROUP BY i.label, i.prediction
    ), lists AS (
        SELECT label, prediction, size,
               list_value(*COLUMNS('^sum_')) AS sums, list_value(*COLUMNS('^sq_')) AS squares,
               list_value(*COLUMNS('^act_')) AS actives, list_value(*COLUMNS('^min_')) AS minima,
               list_value(*COLUMNS('^max_')) AS maxima
        FROM totals
    )
    SELECT layer_name AS layer, label, prediction, unnest(range(len(sums)))::INTEGER AS neuron, size,
           unnest(sums)::DOUBLE AS total, unnest(squares)::DOUBLE AS total_sq, unnest(actives)::BIGINT AS active,
           unnest(minima)::DOUBLE AS minimum, unnest(maxima)::DOUBLE AS maximum
    FROM lists;

CREATE VIEW neurons AS
    SELECT layer, neuron, sum(size)::BIGINT AS size, _mean(sum(total), sum(size)) AS mean,
           _std(sum(total), sum(total_sq), sum(size)) AS std, _mean(sum(active), sum(size)) AS frac_active,
           min(minimum) AS minimum, max(maximum) AS maximum
    FROM neuron_cells
    GROUP BY layer, neuron
    ORDER BY layer, neuron;
COMMENT ON VIEW neurons IS 'One row per recorded neuron: mean, std, fraction active (> 0), min and max over all instances.';
