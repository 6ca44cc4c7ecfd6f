{{ config(tags=['analysis']) }}
select
    cast(unit_id as varchar) as unit_id,
    cast(period as varchar) as period,
    chip_key,
    status,
    reason,
    cast(valid_share as double) as valid_share,
    -- NaN (a source that cannot tell) reads as unknown
    cast(case when isnan(cloud_share) then null else cloud_share end as double) as cloud_share,
    source_file
from {{ source('lake', 'image_chips') }}
