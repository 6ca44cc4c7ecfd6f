{{ config(materialized='incremental', incremental_strategy='append', on_schema_change='append_new_columns', tags=['heterogeneity']) }}
-- Append-only history: a version already stored is never rewritten or duplicated.
select *
from {{ ref('stg_cate_predictions') }}
{% if is_incremental() %}
where cate_version not in (select distinct cate_version from {{ this }})
{% endif %}
