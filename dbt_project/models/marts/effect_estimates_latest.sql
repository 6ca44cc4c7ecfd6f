{{ config(materialized='view', tags=['estimates']) }}
-- Each study's current estimates: the version its last estimates run selected (so going back to an
-- earlier analysis spec shows that spec's version again, though its rows are older), or, for a
-- study without a record of it, the most recently computed version.
with newest as (
    select study, arg_max(estimate_version, computed_at) as estimate_version
    from {{ ref('effect_estimates') }}
    group by study
),
latest as (
    select n.study, coalesce(c.estimate_version, n.estimate_version) as estimate_version
    from newest as n
    left join {{ ref('current_estimate') }} as c using (study)
)
select e.*
from {{ ref('effect_estimates') }} as e
join latest using (study, estimate_version)
