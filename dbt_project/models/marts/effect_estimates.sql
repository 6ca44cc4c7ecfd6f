{{ config(materialized='incremental', incremental_strategy='append', on_schema_change='append_new_columns', tags=['estimates'],
          pre_hook="{{ retype_null_columns(this, {'specification_warning': 'varchar', 'chip_scale_warning': 'varchar', 'sensitivity': 'varchar', 'outcome_source': 'varchar'}) }}") }}
-- Append-only history: a version already stored is never rewritten or duplicated. Keyed by study and
-- version: versions hash inputs and spec, not the study's name, so a study renamed (or copied) in the
-- same working folder has the same version, and its rows must still be added.
select *
from {{ ref('stg_effect_estimates') }}
{% if is_incremental() %}
where (study, estimate_version) not in (select distinct study, estimate_version from {{ this }})
{% endif %}
