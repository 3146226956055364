-- The statistics tables of a run's catalog, created by storage/catalog.py:build_catalog
-- before the operators that read them (operators.sql) and the helpers that fill them (build.sql).

CREATE TABLE neuron_cells (
    layer VARCHAR, label BIGINT, prediction BIGINT, neuron INTEGER, size BIGINT,
    total DOUBLE, total_sq DOUBLE, active BIGINT, minimum DOUBLE, maximum DOUBLE
);
COMMENT ON TABLE neuron_cells IS 'Per layer, (label, prediction) cell and neuron: size, sum, sum of squares, count active (> 0), min, max. Serves neuron_matrix_by and neurons.';

CREATE TABLE attribution_cells (
    method VARCHAR, target_rank SMALLINT, label BIGINT, prediction BIGINT, position INTEGER, size BIGINT,
    total DOUBLE, total_abs DOUBLE
);
COMMENT ON TABLE attribution_cells IS 'Per method, target rank, (label, prediction) cell and stored map position: size, sum and sum of absolute attributions. Serves attribution_map_by.';

CREATE TABLE token_cells (
    method VARCHAR, target_rank SMALLINT, label BIGINT, prediction BIGINT, token VARCHAR, occurrences BIGINT,
    instances BIGINT, total DOUBLE, total_abs DOUBLE
);
COMMENT ON TABLE token_cells IS 'A text run''s per-token sums: per method, target rank, (label, prediction) cell and token, its occurrences, the instances it occurs in, and the sum and sum of absolute values of its attributions. Serves top_tokens_by.';

CREATE TABLE neuron_top AS
    SELECT ''::VARCHAR AS layer, 0::INTEGER AS neuron, 0::BIGINT AS rank, instance_id, 0::FLOAT AS activation
    FROM instances LIMIT 0;
COMMENT ON TABLE neuron_top IS 'Per layer and neuron, the instances that activate it most (rank 1 highest; NaN above every number, ties by id), as many as _neuron_top_kept(): serves top_instances and neuron_exemplars.';

CREATE TABLE activation_index_parts (part VARCHAR, first_row BIGINT, "rows" BIGINT);
COMMENT ON TABLE activation_index_parts IS 'Where each part''s rows lie in the activation index (index/layers/<layer>/part-<part>.npy): parts in key order, numbered from first_row.';

CREATE TABLE fidelity_summary (
    method VARCHAR, instances BIGINT, mean_abs_convergence_delta DOUBLE, max_abs_convergence_delta DOUBLE,
    mean_deletion_auc DOUBLE, mean_insertion_auc DOUBLE, sampled BIGINT, mean_infidelity DOUBLE,
    mean_sensitivity_max DOUBLE, mean_randomization_spearman DOUBLE, mean_randomization_spearman_abs DOUBLE
);
COMMENT ON TABLE fidelity_summary IS 'Per method, how faithful its explanations are: Integrated Gradients/DeepLift convergence delta, mean deletion AUC (lower is better) and insertion AUC (higher is better) over every instance; on the sampled instances (fidelity_<method> views) mean infidelity and sensitivity-max (lower is better) and the rank correlation of each map with the map of a randomly re-initialised model (near 0 passes the model-randomization check)';

CREATE TABLE layers (layer VARCHAR, view VARCHAR, vectors_view VARCHAR, neurons BIGINT, output_shape VARCHAR);
COMMENT ON TABLE layers IS 'Recorded layers: the wide table (one column n<i> per neuron; NULL if too wide), the Parquet vector view, neurons, output shape before pooling.';

CREATE TABLE methods (method VARCHAR, view VARCHAR, stored_shape VARCHAR);
COMMENT ON TABLE methods IS 'Attribution tables: view, and the shape of each stored map (NULL in summary mode).';

CREATE TABLE parquet_views (view VARCHAR, path VARCHAR);
COMMENT ON TABLE parquet_views IS 'Views over Parquet parts, with paths relative to the run directory (set file_search_path to the run when not inside it).';

COMMENT ON TABLE instances IS 'One row per instance: label, prediction, probabilities, confidence, correct, metadata columns.';

CREATE TABLE projection_models (kind VARCHAR, source VARCHAR, algorithms VARCHAR[], dimensions BIGINT, sample_rows BIGINT, explained_variance_ratio DOUBLE[]);
COMMENT ON TABLE projection_models IS 'Fitted 2-D projections: per projected table (kind activations|attributions, source layer or method) the algorithms, vector length, sample rows fitted on, and the PCA components'' explained variance ratios.';

CREATE TABLE features (position INTEGER, feature VARCHAR, kind VARCHAR, columns VARCHAR[], categories VARCHAR[]);
COMMENT ON TABLE features IS 'A tabular run''s features in model order: a column, or a categorical''s one-hot columns as one (kind categorical: its categories in column order); feature_attribution and feature_value hold one entry per row here.';
