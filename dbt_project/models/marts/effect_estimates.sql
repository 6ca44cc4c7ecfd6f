{{ config(materialized='incremental', incremental_strategy='append', on_schema_change='append_new_columns', tags=['estimates']) }}
-- Append-only history: a version already stored is never rewritten or duplicated.
select *
from {{ ref('stg_effect_estimates') }}
{% if is_incremental() %}
where estimate_version not in (select distinct estimate_version from {{ this }})
{% endif %}
