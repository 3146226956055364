-- Built once per run by storage/catalog.py:build_catalog. The _merged_* macros add up the
-- workers' per-part statistics (storage/part_statistics.py) into the catalog's tables (the
-- attribution cells, lists of sums, are added up in numpy: merge_attribution_cells);
-- `parts` is the glob of one statistics table's parts. Temporary macros are build helpers
-- and are not kept.

-- Per (label, prediction) cell and neuron: sizes, sums and counts add, minima and maxima
-- take their extremes (NaN as DuckDB orders it: above every number).
CREATE TEMP MACRO _merged_neuron_cells(parts) AS TABLE
    SELECT layer, label, prediction, neuron, sum(size)::BIGINT AS size, sum(total) AS total,
           sum(total_sq) AS total_sq, sum(active)::BIGINT AS active, min(minimum) AS minimum, max(maximum) AS maximum
    FROM read_parquet(parts)
    GROUP BY ALL;

-- Each part kept its own top rows per neuron; the run's top rows are among them.
CREATE TEMP MACRO _merged_neuron_top(parts) AS TABLE
    SELECT layer, neuron, row_number() OVER (PARTITION BY layer, neuron ORDER BY activation DESC, instance_id) AS rank,
           instance_id, activation
    FROM read_parquet(parts)
    QUALIFY rank <= _neuron_top_kept();

-- Means from counts and sums of the non-null values (as avg() skips nulls).
CREATE TEMP MACRO _merged_method_summary(parts) AS TABLE
    SELECT method, sum(rows)::BIGINT AS instances,
           sum(abs_delta_sum) / nullif(sum(abs_delta_count), 0) AS mean_abs_convergence_delta,
           max(abs_delta_max) AS max_abs_convergence_delta,
           sum(deletion_auc_sum) / nullif(sum(deletion_auc_count), 0) AS mean_deletion_auc,
           sum(insertion_auc_sum) / nullif(sum(insertion_auc_count), 0) AS mean_insertion_auc,
           sum(sampled)::BIGINT AS sampled,
           sum(infidelity_sum) / nullif(sum(infidelity_count), 0) AS mean_infidelity,
           sum(sensitivity_max_sum) / nullif(sum(sensitivity_max_count), 0) AS mean_sensitivity_max,
           sum(randomization_spearman_sum) / nullif(sum(randomization_spearman_count), 0)
               AS mean_randomization_spearman,
           sum(randomization_spearman_abs_sum) / nullif(sum(randomization_spearman_abs_count), 0)
               AS mean_randomization_spearman_abs
    FROM read_parquet(parts, file_row_number = true)
    GROUP BY method
    ORDER BY min(file_row_number), method;  -- each part lists the methods in the spec's order

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
