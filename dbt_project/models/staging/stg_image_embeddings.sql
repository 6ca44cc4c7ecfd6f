{{ config(tags=['analysis']) }}
select
    cast(unit_id as varchar) as unit_id,
    cast(period as varchar) as period,
    embedding,
    len(embedding) as embedding_dim,
    embedding_version,
    embedding_method
from {{ source('lake', 'image_embeddings') }}
