-- Run by storage/statistics_merge.py:StatisticsMerge on its own in-memory connection. Each
-- macro adds up `parts`, the name of a relation of one statistics table's rows in the
-- workers' per-part schema (storage/part_statistics.py): the running totals so far and the
-- newly arrived parts. The _summed_* macros return that same schema (so that totals can be
-- added to again; _summed_method_summary also its rows' first position), _ranked_neuron_top
-- and _merged_method_summary the catalog's neuron_top and fidelity_summary (neuron_cells
-- totals are already the catalog's). `position` is a row's place in the input, the running
-- totals first: first-seen order.

-- Per (label, prediction) cell and neuron: sizes, sums and counts add, minima and maxima
-- take their extremes (NaN as DuckDB orders it: above every number).
CREATE TEMP MACRO _summed_neuron_cells(parts) AS TABLE
    SELECT layer, label, prediction, neuron, sum(size)::BIGINT AS size, sum(total) AS total,
           sum(total_sq) AS total_sq, sum(active)::BIGINT AS active, min(minimum) AS minimum, max(maximum) AS maximum
    FROM query_table(parts)
    GROUP BY ALL;

-- Each part kept its own top rows per neuron; the run's top rows are among them.
CREATE TEMP MACRO _ranked_neuron_top(parts) AS TABLE
    SELECT layer, neuron, row_number() OVER (PARTITION BY layer, neuron ORDER BY activation DESC, instance_id) AS rank,
           instance_id, activation
    FROM query_table(parts)
    QUALIFY rank <= _neuron_top_kept();

CREATE TEMP MACRO _summed_neuron_top(parts) AS TABLE
    SELECT layer, neuron, instance_id, activation FROM _ranked_neuron_top(parts);

CREATE TEMP MACRO _summed_method_summary(parts) AS TABLE
    SELECT method, sum(rows)::BIGINT AS rows,
           sum(abs_delta_count)::BIGINT AS abs_delta_count, sum(abs_delta_sum) AS abs_delta_sum,
           sum(deletion_auc_count)::BIGINT AS deletion_auc_count, sum(deletion_auc_sum) AS deletion_auc_sum,
           sum(insertion_auc_count)::BIGINT AS insertion_auc_count, sum(insertion_auc_sum) AS insertion_auc_sum,
           max(abs_delta_max) AS abs_delta_max, sum(sampled)::BIGINT AS sampled,
           sum(infidelity_count)::BIGINT AS infidelity_count, sum(infidelity_sum) AS infidelity_sum,
           sum(sensitivity_max_count)::BIGINT AS sensitivity_max_count, sum(sensitivity_max_sum) AS sensitivity_max_sum,
           sum(randomization_spearman_count)::BIGINT AS randomization_spearman_count,
           sum(randomization_spearman_sum) AS randomization_spearman_sum,
           sum(randomization_spearman_abs_count)::BIGINT AS randomization_spearman_abs_count,
           sum(randomization_spearman_abs_sum) AS randomization_spearman_abs_sum,
           min(position) AS position  -- each part lists the methods in the spec's order
    FROM query_table(parts)
    GROUP BY method
    ORDER BY position, method;

-- Means from counts and sums of the non-null values (as avg() skips nulls).
CREATE TEMP MACRO _merged_method_summary(parts) AS TABLE
    SELECT method, rows::BIGINT AS instances,
           abs_delta_sum / nullif(abs_delta_count, 0) AS mean_abs_convergence_delta,
           abs_delta_max AS max_abs_convergence_delta,
           deletion_auc_sum / nullif(deletion_auc_count, 0) AS mean_deletion_auc,
           insertion_auc_sum / nullif(insertion_auc_count, 0) AS mean_insertion_auc,
           sampled,
           infidelity_sum / nullif(infidelity_count, 0) AS mean_infidelity,
           sensitivity_max_sum / nullif(sensitivity_max_count, 0) AS mean_sensitivity_max,
           randomization_spearman_sum / nullif(randomization_spearman_count, 0) AS mean_randomization_spearman,
           randomization_spearman_abs_sum / nullif(randomization_spearman_abs_count, 0)
               AS mean_randomization_spearman_abs
    FROM _summed_method_summary(parts)
    ORDER BY position, method;

-- Per (method, rank, label, prediction, token): every count and sum adds (each instance is
-- in one part only, so the instances counts add too).
CREATE TEMP MACRO _summed_token_cells(parts) AS TABLE
    SELECT method, target_rank, label, prediction, token, sum(occurrences)::BIGINT AS occurrences,
           sum(instances)::BIGINT AS instances, sum(total) AS total, sum(total_abs) AS total_abs
    FROM query_table(parts)
    GROUP BY ALL;
