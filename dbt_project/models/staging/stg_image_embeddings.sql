{{ config(tags=['analysis']) }}
-- The embedding's leading principal components (embedding.pca_components of them, from the PCA
-- the embedding stage fits once over every embedded unit): the estimators' image features. The
-- full embedding stays in the lake (lake/image_embeddings/period=<p>.parquet, column embedding).
select
    cast(unit_id as varchar) as unit_id,
    cast(period as varchar) as period,
    image_components,
    len(image_components) as n_image_components,
    len(embedding) as embedding_dim,
    embedding_version,
    embedding_method
from {{ source('lake', 'image_embeddings') }}
