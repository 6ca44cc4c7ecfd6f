{{ config(materialized='incremental', incremental_strategy='append', on_schema_change='append_new_columns', tags=['heterogeneity']) }}
-- Append-only history: a version already stored is never rewritten or duplicated.
select *
from {{ ref('stg_transport_predictions') }}
{% if is_incremental() %}
where transport_version not in (select distinct transport_version from {{ this }})
{% endif %}
