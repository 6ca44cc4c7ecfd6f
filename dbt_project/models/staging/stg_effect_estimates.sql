{{ config(tags=['estimates']) }}
select * from {{ source('lake', 'effect_estimates') }}
