-- Built once per run by storage/catalog.py:build_catalog. Temporary macros are build helpers
-- and are not kept. (The workers' per-part statistics are added up by
-- storage/statistics_merge.py, with storage/sql/merge.sql.)

-- The activation index's numbering: the parts of `parts` (the instances table's glob) in
-- key order, each part's rows in file order.
CREATE TEMP MACRO _index_parts(parts) AS TABLE
    SELECT regexp_extract(filename, 'part-([^/.]+)\.parquet$', 1) AS part,
           (sum(count(*)) OVER (ORDER BY filename) - count(*))::BIGINT AS first_row, count(*)::BIGINT AS "rows"
    FROM read_parquet(parts, filename = true)
    GROUP BY filename
    ORDER BY filename;

CREATE TEMP MACRO _index_rows(parts) AS TABLE
    SELECT t.instance_id, p.first_row + t.file_row_number AS row
    FROM read_parquet(parts, filename = true, file_row_number = true) AS t
         JOIN _index_parts(parts) AS p ON regexp_extract(t.filename, 'part-([^/.]+)\.parquet$', 1) = p.part;

CREATE VIEW neurons AS
    SELECT layer, neuron, sum(size)::BIGINT AS size, _mean(sum(total), sum(size)) AS mean,
           _std(sum(total), sum(total_sq), sum(size)) AS std, _mean(sum(active), sum(size)) AS frac_active,
           min(minimum) AS minimum, max(maximum) AS maximum
    FROM neuron_cells
    GROUP BY layer, neuron
    ORDER BY layer, neuron;
COMMENT ON VIEW neurons IS 'One row per recorded neuron: mean, std, fraction active (> 0), min and max over all instances.';
