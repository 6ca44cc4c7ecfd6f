{% macro retype_null_columns(relation, columns) %}
  {#- An incremental table created when a column held only NULLs has DuckDB's NULL type there, and
      rejects the first non-NULL value appended later: give such columns their declared type. -#}
  {%- if execute and relation is not none -%}
    {%- set existing = adapter.get_relation(database=relation.database, schema=relation.schema, identifier=relation.identifier) -%}
    {%- if existing is not none -%}
      {%- for column in adapter.get_columns_in_relation(existing) -%}
        {%- if column.dtype | upper == '"NULL"' or column.dtype | upper == 'NULL' -%}
          {%- if column.name in columns %}
            alter table {{ existing }} alter column {{ adapter.quote(column.name) }} type {{ columns[column.name] }};
          {%- endif -%}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
  {%- endif -%}
{% endmacro %}
