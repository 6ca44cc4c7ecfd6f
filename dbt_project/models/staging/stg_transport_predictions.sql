{{ config(tags=['heterogeneity']) }}
select * from {{ source('heterogeneity_lake', 'transport_predictions') }}
