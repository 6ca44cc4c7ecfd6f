{{ config(materialized='incremental', incremental_strategy='append', on_schema_change='append_new_columns', tags=['heterogeneity']) }}
-- Append-only history: a version already stored is never rewritten or duplicated. Keyed by study and
-- version: versions hash inputs and spec, not the study's name, so a study renamed (or copied) in the
-- same working folder has the same version, and its rows must still be added.
select *
from {{ ref('stg_cate_evaluation') }}
{% if is_incremental() %}
where (study, cate_version) not in (select distinct study, cate_version from {{ this }})
{% endif %}
