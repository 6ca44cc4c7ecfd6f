{{ config(tags=['analysis']) }}
-- Canonical survey units; covariates (cov_*) pass through as they are.
select
    cast(unit_id as varchar) as unit_id,
    cast(lat as double) as lat,
    cast(lon as double) as lon,
    cast(treatment as integer) as treatment,
    cast(outcome as double) as outcome,
    * exclude (unit_id, lat, lon, treatment, outcome)
from {{ source('lake', 'survey') }}
