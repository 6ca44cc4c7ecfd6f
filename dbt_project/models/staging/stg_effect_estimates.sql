{{ config(tags=['estimates']) }}
-- Typed: a column that is NULL in every row of a Parquet file (no warning yet, no sensitivity for
-- the estimators asked) reads as DuckDB's NULL type; the marts' contracts need the declared types.
{%- set columns = [
    ('study', 'varchar'), ('estimate_version', 'varchar'), ('estimand', 'varchar'), ('estimator', 'varchar'),
    ('feature_set', 'varchar'), ('estimate', 'double'), ('std_error', 'double'), ('ci_low', 'double'),
    ('ci_high', 'double'), ('n', 'bigint'), ('n_treated', 'bigint'), ('n_control', 'bigint'),
    ('n_features', 'bigint'), ('code_version', 'varchar'), ('survey_version', 'varchar'),
    ('embeddings_version', 'varchar'), ('analysis_spec', 'varchar'), ('diagnostics', 'varchar'),
    ('computed_at', 'timestamp with time zone'), ('outcome_source', 'varchar'), ('n_outcome_observed', 'bigint'),
    ('robustness_value', 'double'), ('robustness_value_alpha', 'double'), ('sensitivity', 'varchar'),
    ('specification_warning', 'varchar'), ('chip_scale_warning', 'varchar'), ('fragility', 'varchar'),
] %}
select
{%- for name, type in columns %}
    cast({{ name }} as {{ type }}) as {{ name }}{{ ',' if not loop.last }}
{%- endfor %}
from {{ source('lake', 'effect_estimates') }}
