{{ config(tags=['analysis']) }}
select
    cast(unit_id as varchar) as unit_id,
    chip_key,
    status,
    reason,
    cast(valid_share as double) as valid_share,
    source_file
from {{ source('lake', 'image_chips') }}
