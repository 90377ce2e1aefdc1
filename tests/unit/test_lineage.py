"""Column lineage of query results and writes (masking of derived values)."""

from __future__ import annotations

import dataclasses

import pytest

from pgwarden_proxy.masking import lineage as lineage_module
from pgwarden_proxy.masking.lineage import Column, Lineage, LineageUnknown, Schema, lineage

SCHEMA: Schema = {
    "public": {
        "customers": ["id", "name", "email", "ssn", "notes"],
        "orders": ["id", "customer_id", "total", "note"],
        "customer_emails": ["id", "email"],  # a view
        "Mixed": ["Id", "Email"],
    },
    "crm": {
        "contacts": ["id", "email", "phone"],
        "customers": ["id", "vip"],
    },
}

CUSTOMERS = "customers.id customers.name customers.email customers.ssn customers.notes"
ORDERS = "orders.id orders.customer_id orders.total orders.note"


def cols(spec: str) -> frozenset[Column]:
    """'customers.email crm.contacts.phone' -> base columns (schema public when omitted)."""
    out: set[Column] = set()
    for ref in spec.split():
        parts = ref.split(".")
        schema, table, column = parts if len(parts) == 3 else ["public", *parts]
        out.add((schema, table, column))
    return frozenset(out)


def outputs(*specs: str) -> tuple[frozenset[Column], ...]:
    return tuple(cols(s) for s in specs)


def star(spec: str) -> list[str]:
    """One output per column: the expansion of `*`."""
    return spec.split()


# (sql, per-output lineage: each a space-separated list of columns, "" for none)
SELECTS: list[tuple[str, list[str]]] = [
    # plain references, aliases, *
    ("SELECT email FROM customers", ["customers.email"]),
    ("SELECT c.email AS e, id FROM customers c", ["customers.email", "customers.id"]),
    ("SELECT * FROM customers", star(CUSTOMERS)),
    ("SELECT c.* FROM customers c", star(CUSTOMERS)),
    ("SELECT o.*, c.email FROM orders o, customers c", [*star(ORDERS), "customers.email"]),
    ("TABLE customers", star(CUSTOMERS)),
    ("SELECT id, email FROM customer_emails", ["customer_emails.id", "customer_emails.email"]),
    # casts
    ("SELECT email::text FROM customers", ["customers.email"]),
    ("SELECT CAST(ssn AS varchar(3)) FROM customers", ["customers.ssn"]),
    (
        "SELECT email::varchar(10)[], ARRAY[ssn]::text[] FROM customers",
        ["customers.email", "customers.ssn"],
    ),
    ('SELECT email COLLATE "C" FROM customers', ["customers.email"]),
    # functions and operators
    ("SELECT upper(email), md5(ssn) FROM customers", ["customers.email", "customers.ssn"]),
    ("SELECT lower(substr(email, 1, 3)) FROM customers", ["customers.email"]),
    ("SELECT email || ssn FROM customers", ["customers.email customers.ssn"]),
    (
        "SELECT concat(name, email), concat_ws(',', ssn) FROM customers",
        ["customers.name customers.email", "customers.ssn"],
    ),
    ("SELECT format('%s <%s>', name, email) FROM customers", ["customers.name customers.email"]),
    (
        "SELECT regexp_replace(email, '@.*', ''), split_part(ssn, '-', 1) FROM customers",
        ["customers.email", "customers.ssn"],
    ),
    (
        "SELECT substring(email from 2), trim(both 'x' from ssn), overlay(name placing 'x' "
        "from 1) FROM customers",
        ["customers.email", "customers.ssn", "customers.name"],
    ),
    ("SELECT email->>'a', email LIKE 'a%', email IS NULL FROM customers", ["customers.email"] * 3),
    ("SELECT (ARRAY[email, ssn])[1] FROM customers", ["customers.email customers.ssn"]),
    ("SELECT encode(digest(ssn, 'sha256'), 'hex') FROM customers", ["customers.ssn"]),
    ("SELECT f(x => email) FROM customers", ["customers.email"]),
    # CASE, COALESCE and friends (conditions count: over-approximation)
    ("SELECT CASE WHEN ssn LIKE '1%' THEN 'a' ELSE 'b' END FROM customers", ["customers.ssn"]),
    ("SELECT CASE email WHEN 'a' THEN name END FROM customers", ["customers.email customers.name"]),
    (
        "SELECT COALESCE(notes, email), NULLIF(email, ''), GREATEST(email, ssn) FROM customers",
        ["customers.notes customers.email", "customers.email", "customers.email customers.ssn"],
    ),
    # aggregates
    ("SELECT count(email) FROM customers", ["customers.email"]),
    ("SELECT count(*) FROM customers", [""]),
    (
        "SELECT count(DISTINCT ssn), max(ssn), min(email) FROM customers",
        ["customers.ssn", "customers.ssn", "customers.email"],
    ),
    ("SELECT count(c.*) FROM customers c", [CUSTOMERS]),
    ("SELECT string_agg(email, ',') FROM customers", ["customers.email"]),
    ("SELECT array_agg(ssn) FROM customers", ["customers.ssn"]),
    ("SELECT string_agg(name, ',' ORDER BY ssn) FROM customers", ["customers.name customers.ssn"]),
    ("SELECT count(*) FILTER (WHERE ssn > '1') FROM customers", [""]),
    ("SELECT mode() WITHIN GROUP (ORDER BY email) FROM customers", ["customers.email"]),
    ("SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY ssn) FROM customers", ["customers.ssn"]),
    # JSON / XML / array / row constructors
    ("SELECT json_build_object('e', email) FROM customers", ["customers.email"]),
    ("SELECT jsonb_agg(email) FROM customers", ["customers.email"]),
    ("SELECT json_object('k': ssn) FROM customers", ["customers.ssn"]),
    ("SELECT xmlelement(name foo, email) FROM customers", ["customers.email"]),
    ('SELECT xmlelement(name "Foo", xmlattributes(ssn AS s)) FROM customers', ["customers.ssn"]),
    ("SELECT xmlforest(email, ssn AS s) FROM customers", ["customers.email customers.ssn"]),
    ("SELECT xmlagg(xmlelement(name e, email)) FROM customers", ["customers.email"]),
    ("SELECT ARRAY[email, name] FROM customers", ["customers.email customers.name"]),
    (
        "SELECT ROW(email, 1), (email, ssn) FROM customers",
        ["customers.email", "customers.email customers.ssn"],
    ),
    ("SELECT (ROW(email)).f1 FROM customers", ["customers.email"]),
    # whole-row references
    ("SELECT c FROM customers c", [CUSTOMERS]),
    ("SELECT customers FROM customers", [CUSTOMERS]),
    ("SELECT row_to_json(c) FROM customers c", [CUSTOMERS]),
    ("SELECT row_to_json(c.*) FROM customers c", [CUSTOMERS]),
    ("SELECT to_jsonb(c) FROM customers c", [CUSTOMERS]),
    ("SELECT ROW(c.*) FROM customers c", [CUSTOMERS]),
    ("SELECT json_agg(c ORDER BY c.id) FROM customers c", [CUSTOMERS]),
    ("SELECT hstore(c) FROM customers c", [CUSTOMERS]),
    ("SELECT (c).email FROM customers c", [CUSTOMERS]),
    ("SELECT (c).* FROM customers c", star(CUSTOMERS)),
    (
        "SELECT to_jsonb(o) || to_jsonb(c) FROM orders o JOIN customers c ON c.id = o.customer_id",
        [f"{ORDERS} {CUSTOMERS}"],
    ),
    ("SELECT t FROM (SELECT email FROM customers) t", ["customers.email"]),
    (
        "SELECT row_to_json(t) FROM (SELECT id, ssn FROM customers) t",
        ["customers.id customers.ssn"],
    ),
    # scalar / ARRAY / EXISTS subqueries in the select list
    ("SELECT (SELECT max(ssn) FROM customers) AS m", ["customers.ssn"]),
    (
        "SELECT (SELECT c2.email FROM customers c2 WHERE c2.id = c.id) FROM customers c",
        ["customers.email"],
    ),
    ("SELECT (SELECT email FROM crm.contacts LIMIT 1) FROM customers", ["crm.contacts.email"]),
    (
        "SELECT (SELECT ssn FROM crm.contacts LIMIT 1) FROM customers",
        ["customers.ssn"],
    ),  # correlated
    ("SELECT (SELECT ssn FROM generate_series(1, 2) g) FROM customers", ["customers.ssn"]),
    ("SELECT ARRAY(SELECT email FROM customers)", ["customers.email"]),
    ("SELECT EXISTS (SELECT 1 FROM customers WHERE ssn = 'x')", [""]),
    ("SELECT (SELECT json_agg(t) FROM (SELECT email FROM customers) t)", ["customers.email"]),
    (
        "SELECT email IN (SELECT phone FROM crm.contacts) FROM customers",
        ["customers.email crm.contacts.phone"],
    ),
    # CTEs
    ("WITH a AS (SELECT email FROM customers) SELECT email FROM a", ["customers.email"]),
    (
        "WITH a AS (SELECT email FROM customers), b AS (SELECT email AS e FROM a) SELECT e FROM b",
        ["customers.email"],
    ),
    (
        "WITH a(x, y) AS (SELECT ssn, id FROM customers) SELECT y, x FROM a",
        ["customers.id", "customers.ssn"],
    ),
    (
        "WITH a AS (SELECT email FROM customers) SELECT * FROM (WITH a AS (SELECT name FROM "
        "customers) SELECT * FROM a) s",
        ["customers.name"],
    ),
    (
        "WITH customers AS (SELECT name AS email FROM public.customers) SELECT email FROM "
        "customers",
        ["customers.name"],
    ),
    ("WITH x AS (SELECT 1 AS email) SELECT x.email FROM x", [""]),
    ("SELECT (WITH q AS (SELECT ssn FROM customers) SELECT max(ssn) FROM q)", ["customers.ssn"]),
    (
        "WITH RECURSIVE r(n, e) AS (SELECT 1, email FROM customers UNION ALL SELECT n + 1, e "
        "FROM r WHERE n < 3) SELECT * FROM r",
        ["", "customers.email"],
    ),
    (
        "WITH RECURSIVE r AS (SELECT id, email FROM customers UNION ALL SELECT r.id, c.ssn "
        "FROM r JOIN customers c ON c.id = r.id) SELECT email FROM r",
        ["customers.email customers.ssn"],
    ),
    (
        "WITH RECURSIVE r AS (SELECT name AS v FROM customers UNION SELECT c.ssn FROM r, "
        "customers c) SELECT v FROM r",
        ["customers.name customers.ssn"],
    ),
    (
        "WITH RECURSIVE a AS (SELECT email AS v FROM customers UNION SELECT v FROM b), b AS "
        "(SELECT v FROM a UNION SELECT ssn FROM customers) SELECT v FROM a",
        ["customers.email customers.ssn"],
    ),
    # derived tables
    ("SELECT t.x FROM (SELECT email AS x, id FROM customers) t", ["customers.email"]),
    (
        "SELECT * FROM (SELECT id, upper(ssn) AS u FROM customers) t",
        ["customers.id", "customers.ssn"],
    ),
    ("SELECT t.upper FROM (SELECT upper(ssn) FROM customers) t", ["customers.ssn"]),
    ("SELECT e.* FROM (SELECT * FROM customers) e", star(CUSTOMERS)),
    ("SELECT b FROM (SELECT email, ssn FROM customers) AS t(a, b)", ["customers.ssn"]),
    ("SELECT e FROM customers AS c(a, b, e)", ["customers.email"]),
    ("SELECT * FROM (VALUES (1, 'a')) v(a, b)", ["", ""]),
    (
        "SELECT * FROM (VALUES ((SELECT email FROM customers LIMIT 1), 1)) v",
        ["customers.email", ""],
    ),
    (
        "SELECT (SELECT max(x) FROM (VALUES (c.ssn), ('a')) v(x)) FROM customers c",
        ["customers.ssn"],
    ),
    # set operations: output i derives from output i of every branch
    (
        "SELECT email FROM customers UNION SELECT phone FROM crm.contacts",
        ["customers.email crm.contacts.phone"],
    ),
    (
        "SELECT id, email FROM customers UNION ALL SELECT id, note FROM orders",
        ["customers.id orders.id", "customers.email orders.note"],
    ),
    (
        "SELECT id, email FROM customers EXCEPT SELECT id, name FROM customers",
        ["customers.id", "customers.email customers.name"],
    ),
    (
        "SELECT email FROM customers INTERSECT SELECT email FROM crm.contacts",
        ["customers.email crm.contacts.email"],
    ),
    ("(SELECT 'x') UNION (SELECT ssn FROM customers) ORDER BY 1 LIMIT 3", ["customers.ssn"]),
    (
        "SELECT name FROM customers UNION ALL SELECT ssn FROM customers UNION ALL SELECT 'x'",
        ["customers.name customers.ssn"],
    ),
    # joins
    (
        "SELECT * FROM customers c JOIN orders o USING (id)",
        ["customers.id orders.id", *star(CUSTOMERS)[1:], *star(ORDERS)[1:]],
    ),
    (
        "SELECT email FROM customers c FULL JOIN crm.contacts k USING (email)",
        ["customers.email crm.contacts.email"],
    ),
    (
        "SELECT * FROM customers NATURAL JOIN crm.contacts",
        [
            "customers.id crm.contacts.id",
            "customers.email crm.contacts.email",
            "customers.name",
            "customers.ssn",
            "customers.notes",
            "crm.contacts.phone",
        ],
    ),
    (
        "SELECT * FROM orders o, customers c JOIN crm.contacts k USING (id)",
        [
            *star(ORDERS),
            "customers.id crm.contacts.id",
            *star(CUSTOMERS)[1:],
            "crm.contacts.email",
            "crm.contacts.phone",
        ],
    ),
    ("SELECT j.email FROM (customers a JOIN orders b ON a.id = b.id) j", ["customers.email"]),
    # LATERAL and functions in FROM
    ("SELECT x.e FROM customers c, LATERAL (SELECT c.email AS e) x", ["customers.email"]),
    ("SELECT s.* FROM customers c CROSS JOIN LATERAL (SELECT c.ssn, 1) s", ["customers.ssn", ""]),
    (
        "SELECT o.last FROM customers c LEFT JOIN LATERAL (SELECT max(c.ssn) AS last FROM "
        "orders) o ON true",
        ["customers.ssn"],
    ),
    ("SELECT u FROM customers c, unnest(ARRAY[c.email]) AS u", ["customers.email"]),
    (
        "SELECT u.* FROM customers c, unnest(ARRAY[c.email]) WITH ORDINALITY AS u(x, n)",
        ["customers.email", "customers.email"],
    ),
    ("SELECT * FROM generate_series(1, 3) g", [""]),
    ("SELECT * FROM unnest(ARRAY[1], ARRAY['a']) WITH ORDINALITY", ["", "", ""]),
    ("SELECT j.value FROM customers c, LATERAL json_each(to_json(c)) j", [CUSTOMERS]),
    ("SELECT f.x FROM customers c, my_func(c.email) f", ["customers.email"]),
    ("SELECT * FROM json_to_record('{}') AS t(x int, y text)", ["", ""]),
    ("SELECT * FROM ROWS FROM (generate_series(1, 2))", [""]),
    (
        "SELECT generate_series(1, length(ssn)), unnest(ARRAY[email]) FROM customers",
        ["customers.ssn", "customers.email"],
    ),
    # window functions: the function's arguments, not PARTITION BY / ORDER BY
    (
        "SELECT first_value(email) OVER (PARTITION BY ssn ORDER BY notes) FROM customers",
        ["customers.email"],
    ),
    (
        "SELECT row_number() OVER (ORDER BY ssn), count(*) OVER (PARTITION BY email) FROM "
        "customers",
        ["", ""],
    ),
    ("SELECT lag(email) OVER w FROM customers WINDOW w AS (PARTITION BY ssn)", ["customers.email"]),
    (
        "SELECT * FROM (SELECT email, row_number() OVER () AS rn FROM customers) t WHERE rn = 1",
        ["customers.email", ""],
    ),
    # filters do not taint (inference through them is a non-goal)
    ("SELECT name FROM customers WHERE ssn = '123'", ["customers.name"]),
    ("SELECT o.total FROM orders o JOIN customers c ON c.email = o.note", ["orders.total"]),
    ("SELECT name FROM customers GROUP BY name, email HAVING count(ssn) > 1", ["customers.name"]),
    ("SELECT name FROM customers ORDER BY email, ssn DESC LIMIT 5", ["customers.name"]),
    ("SELECT DISTINCT ON (ssn) name FROM customers ORDER BY ssn", ["customers.name"]),
    (
        "SELECT ssn FROM customers WHERE email IN (SELECT phone FROM crm.contacts)",
        ["customers.ssn"],
    ),
    (
        "SELECT 1 FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.note = c.email)",
        [""],
    ),
    ("SELECT name FROM customers LIMIT (SELECT count(ssn) FROM customers)", ["customers.name"]),
    ("SELECT email FROM customers FOR UPDATE", ["customers.email"]),
    # literals and functions without column arguments
    ("SELECT now(), current_user, user, 1, 'x', $1", ["", "", "", "", "", ""]),
    ("SELECT extract(year FROM now()), interval '1 day' FROM customers", ["", ""]),
    ("VALUES (1, 'a'), (2, 'b')", ["", ""]),
    ("SELECT", []),
    # identifiers: unquoted names fold to lower case, quoted ones keep it
    ('SELECT "Email", "Id" FROM "Mixed"', ["Mixed.Email", "Mixed.Id"]),
    ("SELECT EMAIL FROM CUSTOMERS", ["customers.email"]),
    ("SELECT Customers.Email FROM Public.Customers", ["customers.email"]),
    ('SELECT "customers"."email" FROM "public"."customers"', ["customers.email"]),
    # schema-qualified names; the unqualified name follows search_path (public)
    ("SELECT vip FROM crm.customers", ["crm.customers.vip"]),
    (
        "SELECT c.email, k.email FROM public.customers c, crm.customers k2, crm.contacts k",
        ["customers.email", "crm.contacts.email"],
    ),
    ("SELECT public.customers.email FROM public.customers", ["customers.email"]),
]

# (sql, outputs, writes_from)
STATEMENTS: list[tuple[str, list[str], str]] = [
    # DML with RETURNING: a written column derives from itself and from what was written into it
    (
        "INSERT INTO orders (id, note) SELECT id, email FROM customers",
        [],
        "customers.id customers.email",
    ),
    (
        "INSERT INTO orders (id, note) SELECT id, email FROM customers RETURNING note, total",
        ["orders.note customers.email", "orders.total"],
        "customers.id customers.email",
    ),
    ("INSERT INTO orders VALUES (1, 2, 3, 'x') RETURNING *", star(ORDERS), ""),
    ("INSERT INTO orders DEFAULT VALUES RETURNING id", ["orders.id"], ""),
    ("INSERT INTO orders (note) VALUES ((SELECT ssn FROM customers LIMIT 1))", [], "customers.ssn"),
    (
        "WITH x AS (SELECT email FROM customers) INSERT INTO orders (note) SELECT email FROM x",
        [],
        "customers.email",
    ),
    (
        "INSERT INTO orders AS o (note) VALUES ('a') ON CONFLICT (id) DO UPDATE SET note = "
        "excluded.note || (SELECT ssn FROM customers LIMIT 1) RETURNING o.note",
        ["orders.note customers.ssn"],
        "customers.ssn",
    ),
    (
        "WITH orders AS (SELECT 1) INSERT INTO orders (note) SELECT email FROM customers",
        [],
        "customers.email",
    ),
    (
        "UPDATE orders o SET note = c.email FROM customers c WHERE c.id = o.customer_id",
        [],
        "customers.email",
    ),
    (
        "UPDATE orders o SET note = c.email FROM customers c WHERE c.id = o.customer_id "
        "RETURNING o.note, c.ssn, o.total",
        ["orders.note customers.email", "customers.ssn", "orders.total"],
        "customers.email",
    ),
    (
        "UPDATE orders SET (note, total) = (SELECT email, 1 FROM customers LIMIT 1)",
        [],
        "customers.email",
    ),
    ("UPDATE customers SET notes = ssn WHERE email = 'x'", [], "customers.ssn"),
    (
        "UPDATE customers SET email = lower(email) RETURNING email",
        ["customers.email"],
        "customers.email",
    ),
    ("UPDATE orders SET note = DEFAULT WHERE id = 1 RETURNING *", star(ORDERS), ""),
    (
        "UPDATE orders o SET note = 'x' FROM customers c RETURNING *",
        [*star(ORDERS), *star(CUSTOMERS)],
        "",
    ),
    ("DELETE FROM customers WHERE ssn = 'x'", [], ""),
    ("DELETE FROM customers WHERE id = 1 RETURNING email", ["customers.email"], ""),
    (
        "DELETE FROM customers USING orders o WHERE o.id = customers.id RETURNING o.note, "
        "customers.ssn",
        ["orders.note", "customers.ssn"],
        "",
    ),
    (
        "MERGE INTO orders o USING customers c ON o.id = c.id WHEN MATCHED THEN UPDATE SET "
        "note = c.email WHEN NOT MATCHED THEN INSERT (id, note) VALUES (c.id, c.ssn)",
        [],
        "customers.email customers.id customers.ssn",
    ),
    (
        "MERGE INTO orders o USING customers c ON o.id = c.id WHEN MATCHED THEN DELETE "
        "RETURNING c.email",
        ["customers.email"],
        "",
    ),
    # data-modifying CTEs
    ("WITH x AS (DELETE FROM customers RETURNING email) SELECT * FROM x", ["customers.email"], ""),
    (
        "WITH x AS (INSERT INTO orders (note) SELECT ssn FROM customers RETURNING id) SELECT "
        "* FROM x",
        ["orders.id"],
        "customers.ssn",
    ),
    # statements that create a relation from a query
    ("CREATE TABLE x AS SELECT email FROM customers", [], "customers.email"),
    (
        "CREATE TEMP TABLE x AS SELECT name, row_to_json(c) FROM customers c WITH NO DATA",
        [],
        CUSTOMERS,
    ),
    ("CREATE MATERIALIZED VIEW mv AS SELECT upper(ssn) FROM customers", [], "customers.ssn"),
    ("CREATE VIEW v AS SELECT email FROM customers", [], "customers.email"),
    ("SELECT email INTO x FROM customers", [], "customers.email"),
    (
        "SELECT name INTO TEMP x FROM customers UNION SELECT ssn FROM customers",
        [],
        "customers.name customers.ssn",
    ),
    ("CREATE TABLE x (a int)", [], ""),
    # COPY
    ("COPY (SELECT email FROM customers) TO STDOUT", ["customers.email"], ""),
    ("COPY (SELECT c FROM customers c) TO STDOUT WITH CSV HEADER", [CUSTOMERS], ""),
    ("COPY customers TO STDOUT (FORMAT csv)", star(CUSTOMERS), ""),
    ("COPY customers (ssn, id) TO STDOUT", ["customers.ssn", "customers.id"], ""),
    ('COPY "customers" (EMAIL) TO STDOUT', ["customers.email"], ""),
    (
        "COPY crm.contacts TO STDOUT",
        ["crm.contacts.id", "crm.contacts.email", "crm.contacts.phone"],
        "",
    ),
    ("COPY (DELETE FROM customers RETURNING email) TO STDOUT", ["customers.email"], ""),
    ("COPY (SELECT ssn FROM customers) TO '/tmp/x'", [], "customers.ssn"),
    ("COPY customers (email) TO PROGRAM 'cat'", [], "customers.email"),
    ("COPY customers FROM STDIN", [], ""),
    # EXPLAIN returns a plan, not values; with ANALYZE the statement runs
    ("EXPLAIN SELECT email FROM customers", [], ""),
    ("EXPLAIN ANALYZE SELECT email FROM customers", [], ""),
    (
        "EXPLAIN (ANALYZE, FORMAT JSON) INSERT INTO orders (note) SELECT email FROM customers",
        [],
        "customers.email",
    ),
    ("EXPLAIN (ANALYZE off) INSERT INTO orders (note) SELECT email FROM customers", [], ""),
    ("EXPLAIN INSERT INTO orders (note) SELECT email FROM customers", [], ""),
    (
        "/* hi */ EXPLAIN ANALYZE VERBOSE CREATE TABLE t AS SELECT ssn FROM customers",
        [],
        "customers.ssn",
    ),
    # DECLARE / PREPARE: outputs of the query (FETCH / EXECUTE return them)
    (
        "DECLARE cur CURSOR FOR SELECT email, id FROM customers",
        ["customers.email", "customers.id"],
        "",
    ),
    ("DECLARE cur NO SCROLL CURSOR WITH HOLD FOR SELECT c FROM customers c", [CUSTOMERS], ""),
    ("PREPARE p (int) AS SELECT ssn FROM customers WHERE id = $1", ["customers.ssn"], ""),
    # no values at all
    ("BEGIN", [], ""),
    ("SET search_path = crm", [], ""),
    ("TRUNCATE customers", [], ""),
]

# (sql, part of the LineageUnknown message)
UNKNOWN: list[tuple[str, str]] = [
    ("SELECT * FROM nope", "relation nope is not known"),
    ("SELECT email FROM crm.nope", "relation crm.nope is not known"),
    ('SELECT email FROM "Customers"', "relation Customers is not known"),
    ("SELECT * FROM pg_catalog.pg_class", "pg_catalog.pg_class is not known"),
    ("DECLARE c CURSOR FOR SELECT * FROM nope", "relation nope is not known"),
    ("COPY nope TO STDOUT", "relation nope is not known"),
    ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", "relation b is not known"),
    ("SELECT nonexistent FROM customers", "column nonexistent could not be resolved"),
    ("SELECT c.nonexistent FROM customers c", "column c.nonexistent is not known"),
    ('SELECT "EMAIL" FROM customers', "column EMAIL could not be resolved"),
    ('SELECT Email FROM "Mixed"', "column email could not be resolved"),
    ("SELECT email FROM customers AS c(a, b, e)", "column email could not be resolved"),
    ("SELECT * FROM customers c, (SELECT c.email) t", "missing FROM-clause entry for table c"),
    ("SELECT * FROM customers c1, orders c1", "specified more than once"),
    ("COPY customers (nope) TO STDOUT", "column nope"),
    ("SELECT email, ssn FROM customers UNION SELECT 1", "different column counts"),
    ("SELECT query_to_xml('select * from customers', true, false, '')", "runs SQL given as text"),
    (
        "SELECT * FROM dblink('db', 'select ssn from customers') AS t(s text)",
        "runs SQL given as text",
    ),
    ("SELECT set_config('x', email, false) FROM customers", "out of band"),
    ("SELECT 1 FROM customers WHERE pg_notify('c', email) IS NULL", "out of band"),
    ("SELECT * FROM customers c, my_func(c.id) f", "cannot expand *"),
    ("SELECT * FROM json_populate_record(NULL::customers, '{}')", "cannot expand *"),
    ("SELECT * FROM unnest((SELECT array_agg(c) FROM customers c))", "cannot expand *"),
    ("SELECT * FROM unnest('{}'::customers[])", "cannot expand *"),
    ("SELECT (s.c).* FROM (SELECT c FROM customers c) s", "could not be expanded"),
    ("SELEC 1", "could not be parsed"),
    ("SELECT 1; SELECT 2", "exactly one statement"),
    ("SHOW search_path", "SHOW statements are not analysed"),
    ("FETCH 10 FROM cur", "FETCH statements are not analysed"),
    ("CALL proc()", "not analysed"),
    ("DO $$ BEGIN END $$", "not analysed"),
    ("ALTER TABLE customers ADD COLUMN x text GENERATED ALWAYS AS (email) STORED", "not analysed"),
    ("CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql", "CREATE FUNCTION"),
    ("EXPLAIN ANALYZE INSERT INTO orders SELECT * FROM nope", "relation nope is not known"),
    ("SELECT " + "(" * 2000 + "email" + ")" * 2000 + " FROM customers", "nested too deeply"),
]


@pytest.mark.parametrize(("sql", "expected"), SELECTS, ids=[s for s, _ in SELECTS])
def test_select_outputs(sql: str, expected: list[str]) -> None:
    result = lineage(sql, SCHEMA)
    assert result.outputs == outputs(*expected)
    assert result.writes_from == frozenset()


@pytest.mark.parametrize(("sql", "expected", "writes"), STATEMENTS, ids=[s for s, *_ in STATEMENTS])
def test_statements(sql: str, expected: list[str], writes: str) -> None:
    result = lineage(sql, SCHEMA)
    assert result.outputs == outputs(*expected)
    assert result.writes_from == cols(writes)


@pytest.mark.parametrize(("sql", "reason"), UNKNOWN, ids=[s[:80] for s, _ in UNKNOWN])
def test_unknown(sql: str, reason: str) -> None:
    with pytest.raises(LineageUnknown) as info:
        lineage(sql, SCHEMA)
    assert reason in str(info.value)


def test_case_table_is_large() -> None:
    assert len(SELECTS) + len(STATEMENTS) + len(UNKNOWN) >= 80


def test_search_path_picks_the_first_schema_with_the_relation() -> None:
    sql = "SELECT * FROM customers"
    assert lineage(sql, SCHEMA, ("crm", "public")).outputs == outputs(
        "crm.customers.id", "crm.customers.vip"
    )
    assert lineage(sql, SCHEMA, ("public", "crm")).outputs == outputs(*star(CUSTOMERS))
    assert lineage("SELECT phone FROM contacts", SCHEMA, ("public", "crm")).outputs == outputs(
        "crm.contacts.phone"
    )
    with pytest.raises(LineageUnknown, match="relation contacts is not known"):
        lineage("SELECT phone FROM contacts", SCHEMA)
    with pytest.raises(LineageUnknown, match="relation customers is not known"):
        lineage(sql, SCHEMA, ())


def test_pg_catalog_is_searched_first_unless_listed() -> None:
    schema: Schema = {**SCHEMA, "pg_catalog": {"customers": ["oid"]}}
    assert lineage("SELECT * FROM customers", schema).outputs == outputs("pg_catalog.customers.oid")
    explicit = lineage("SELECT * FROM customers", schema, ("public", "pg_catalog"))
    assert explicit.outputs == outputs(*star(CUSTOMERS))


def test_quoted_schema_and_relation_names_keep_their_case() -> None:
    schema: Schema = {"Sales": {"Leads": ["Email", "id"]}}
    result = lineage('SELECT l."Email", id FROM "Sales"."Leads" l', schema)
    assert result.outputs == (
        frozenset({("Sales", "Leads", "Email")}),
        frozenset({("Sales", "Leads", "id")}),
    )
    with pytest.raises(LineageUnknown):
        lineage("SELECT * FROM Sales.Leads", schema)


def test_three_table_join_with_cte() -> None:
    sql = """
        WITH recent AS (
            SELECT customer_id, sum(total) AS spent FROM orders GROUP BY customer_id
        )
        SELECT c.name, upper(c.email) AS e, r.spent, k.phone, coalesce(c.notes, k.email) AS n
        FROM customers c
        JOIN recent r ON r.customer_id = c.id
        LEFT JOIN crm.contacts k ON k.email = c.email
        WHERE c.ssn IS NOT NULL
        ORDER BY r.spent DESC
    """
    assert lineage(sql, SCHEMA).outputs == outputs(
        "customers.name",
        "customers.email",
        "orders.total",
        "crm.contacts.phone",
        "customers.notes crm.contacts.email",
    )


def test_result_is_frozen_and_hashable() -> None:
    result = lineage("SELECT email FROM customers", SCHEMA)
    assert isinstance(result, Lineage)
    assert hash(result) == hash(Lineage(outputs("customers.email")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.outputs = ()  # type: ignore[misc]


def test_pathological_recursion_is_bounded() -> None:
    ctes = ", ".join(f"r{i}(v) AS (SELECT v FROM r{i + 1} UNION SELECT 'x')" for i in range(30))
    sql = f"WITH RECURSIVE {ctes}, r30(v) AS (SELECT ssn FROM customers) SELECT v FROM r0"
    assert lineage(sql, SCHEMA).outputs == outputs("customers.ssn")


def test_work_is_budgeted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lineage_module, "_BUDGET_BASE", 3)
    monkeypatch.setattr(lineage_module, "_BUDGET_PER_NODE", 0)
    with pytest.raises(LineageUnknown, match="too complex"):
        lineage("SELECT upper(email), lower(ssn), name || notes FROM customers", SCHEMA)


def test_old_sqlglot_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lineage_module, "_SQLGLOT_OK", False)
    with pytest.raises(LineageUnknown, match="sqlglot 30"):
        lineage("SELECT 1", SCHEMA)
