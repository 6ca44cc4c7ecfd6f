{{ config(tags=['analysis']) }}
-- Every survey unit with its chip record and, where usable, its image components.
select
    s.*,
    c.status as chip_status,
    c.reason as chip_reason,
    c.valid_share,
    e.image_components,
    e.embedding_version
from {{ ref('stg_survey') }} as s
left join {{ ref('stg_image_chips') }} as c using (unit_id)
left join {{ ref('stg_image_embeddings') }} as e using (unit_id)
