{{ config(tags=['estimates']) }}
select
    cast(study as varchar) as study,
    cast(estimate_version as varchar) as estimate_version,
    cast(selected_at as timestamp with time zone) as selected_at
from {{ source('lake', 'current_estimate') }}
