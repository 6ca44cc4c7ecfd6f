{{ config(materialized='table', tags=['estimates']) }}
-- Which version of each study's estimates is current: the one its last estimates run selected.
-- A table, so that the published copy holds it (views there must not read the live lake).
select study, estimate_version, selected_at
from {{ ref('stg_current_estimate') }}
