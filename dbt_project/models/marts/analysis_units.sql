{{ config(tags=['analysis']) }}
-- The estimation sample: survey units with a usable chip and its image components.
select * exclude (chip_status, chip_reason)
from {{ ref('int_units_imaged') }}
where chip_status = 'ok' and image_components is not null
order by unit_id
