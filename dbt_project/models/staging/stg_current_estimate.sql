{{ config(tags=['estimates']) }}
select study, estimate_version, selected_at
from {{ source('lake', 'current_estimate') }}
