{{ config(tags=['analysis']) }}
-- Units left out of the estimation sample, each with its reason (never dropped silently).
select
    unit_id,
    lat,
    lon,
    coalesce(
        case when chip_status = 'excluded' then chip_reason end,
        case when chip_status is null then 'no_chip_record' end,
        case when embedding is null then 'no_embedding' end
    ) as reason,
    valid_share
from {{ ref('int_units_imaged') }}
where chip_status is distinct from 'ok' or embedding is null
order by unit_id
