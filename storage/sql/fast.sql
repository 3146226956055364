-- Loaded by storage/catalog.py:open_catalog into the analyst's in-memory database, where
-- it shadows the catalog's pure-SQL _neuron_moments (same columns, same answers) with one
-- computed by storage/activation_index.py over memory-mapped matrices. Every operator
-- built on _neuron_moments takes this path from Python; the stock duckdb CLI takes the SQL one.
CREATE MACRO _neuron_moments(layer_name, ids) AS TABLE
    SELECT unnest(range(len(m.total)))::INTEGER AS neuron, m.size AS size,
           unnest(m.total) AS total, unnest(m.total_sq) AS total_sq, unnest(m.active) AS active
    FROM (SELECT _neuron_moments_fast(layer_name, ids) AS m);
