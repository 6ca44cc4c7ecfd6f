{{ config(tags=['analysis']) }}
-- Units left out of the estimation sample, each with its reason (never dropped silently).
select
    cast(unit_id as varchar) as unit_id,
    cast(lat as double) as lat,
    cast(lon as double) as lon,
    cast(coalesce(
        case when chip_status = 'excluded' then chip_reason end,
        case when chip_status is null then 'no_chip_record' end,
        case when image_components is null then 'no_embedding' end
    ) as varchar) as reason,
    cast(valid_share as double) as valid_share
from {{ ref('int_units_imaged') }}
where chip_status is distinct from 'ok' or image_components is null
order by unit_id
