-- Loaded by storage/catalog.py:open_catalog into the analyst's in-memory database, where
-- it shadows the catalog's pure-SQL _neuron_moments and _instance_activations (same columns,
-- same answers) with ones computed by storage/activation_index.py over memory-mapped
-- matrices. Every operator built on them takes this path from Python; the stock duckdb CLI
-- takes the SQL one.
CREATE MACRO _neuron_moments(layer_name, ids) AS TABLE
    SELECT unnest(range(len(m.total)))::INTEGER AS neuron, m.size AS size,
           unnest(m.total) AS total, unnest(m.total_sq) AS total_sq, unnest(m.active) AS active
    FROM (SELECT _neuron_moments_fast(layer_name, ids) AS m);

CREATE MACRO _instance_activations(layer_name, instance) AS TABLE
    SELECT unnest(range(len(v)))::INTEGER AS neuron, unnest(v) AS activation
    FROM (SELECT _instance_activations_fast(layer_name, instance) AS v);
