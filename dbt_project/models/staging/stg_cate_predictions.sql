{{ config(tags=['heterogeneity']) }}
select * from {{ source('heterogeneity_lake', 'cate_predictions') }}
