{{ config(tags=['heterogeneity']) }}
select * from {{ source('heterogeneity_lake', 'effect_clusters') }}
