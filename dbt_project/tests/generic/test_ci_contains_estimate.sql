{#- A confidence interval must contain its point estimate. -#}
{% test ci_contains_estimate(model, column_name) %}
select * from {{ model }}
where not (ci_low <= {{ column_name }} and {{ column_name }} <= ci_high)
{% endtest %}
