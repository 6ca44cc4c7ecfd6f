{{ config(materialized='view', tags=['estimates']) }}
-- The most recently computed version of each study's estimates.
with latest as (
    select study, arg_max(estimate_version, computed_at) as estimate_version
    from {{ ref('effect_estimates') }}
    group by study
)
select e.*
from {{ ref('effect_estimates') }} as e
join latest using (study, estimate_version)
