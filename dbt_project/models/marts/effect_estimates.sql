{{ config(materialized='incremental', incremental_strategy='append', tags=['estimates']) }}
-- Append-only history: a version already stored is never rewritten or duplicated.
select *
from {{ ref('stg_effect_estimates') }}
{% if is_incremental() %}
where estimate_version not in (select distinct estimate_version from {{ this }})
{% endif %}
