"""Column lineage: which base columns each output value of a statement derives from.

Direct column references are masked by the proxy from the RowDescription (table OID + attribute
number); this module decides the *derived* values. `lineage()` parses one PostgreSQL statement
with sqlglot, folds identifiers as PostgreSQL does (`normalize_identifiers`), resolves every
relation against a catalog snapshot (`Schema`) and the `search_path`, and walks the tree with
PostgreSQL's name-resolution rules, bottom-up, so that the columns of every source (tables,
CTEs, derived tables, functions) are known where a name or `*` is resolved:

- An output derives from every base column referenced anywhere in its expression: casts,
  operators, function and aggregate arguments (aggregate ORDER BY and WITHIN GROUP included),
  CASE conditions, JSON/XML/array constructors, scalar/ARRAY/EXISTS subqueries (what they
  select), window function arguments.
- Whole-row references (`SELECT c FROM customers c`, `row_to_json(c)`, `c.*` inside a call,
  `ROW(c.*)`, `(c).*`) derive from every column of that relation.
- CTEs (recursive ones by fixpoint), derived tables, LATERAL items, VALUES, set operations
  (output i of every branch), JOIN ... USING / NATURAL (merged columns from both sides) are
  followed to their base columns; functions in FROM derive from their arguments.
- Not part of any output: WHERE, JOIN ... ON, GROUP BY, HAVING, ORDER BY, DISTINCT ON, LIMIT,
  window PARTITION BY / ORDER BY and aggregate FILTER (inference through filters is a
  documented non-goal).

`Lineage.writes_from` lists the base columns whose values flow into a write: INSERT (values,
query, ON CONFLICT DO UPDATE), UPDATE SET, MERGE, data-modifying CTEs, CREATE TABLE AS,
CREATE [MATERIALIZED] VIEW, SELECT INTO, COPY (query) TO a file or program, EXPLAIN ANALYZE of
any of these.

What cannot be analysed raises `LineageUnknown` (fail closed): unknown relations or columns,
statements sqlglot cannot parse or only knows as `exp.Command`, functions that run SQL given as
text (`query_to_xml`, `dblink`, ...), `*` over a function whose columns are not known, names in
places the walk does not understand.

Contract for the caller: `outputs` has one entry per result column as far as the analysis can
tell; if a RowDescription has a different number of fields (a stale catalog snapshot, a
composite-returning function), the caller must refuse rather than mask by position.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from collections.abc import Mapping as _Mapping
from dataclasses import dataclass, field

import pglast
import pglast.ast
import sqlglot
from pglast.parser import ParseError
from pglast.stream import RawStream
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

__all__ = ["Column", "Lineage", "LineageUnknown", "Schema", "lineage"]

Column = tuple[str, str, str]
"""(schema, table, column), as stored in the catalog."""

Schema = _Mapping[str, _Mapping[str, Sequence[str]]]
"""schema -> relation (table or view) -> column names in attribute order."""

_Cols = frozenset[Column]
_NONE: _Cols = frozenset()
_Outputs = list[tuple[str, _Cols]]

# Functions that run SQL passed as text (or read a whole relation or cursor by name): what
# they return cannot be traced to columns.
SQL_TEXT_FUNCTIONS = frozenset(
    {
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "table_to_xml",
        "table_to_xmlschema",
        "table_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
        "dblink",
        "dblink_exec",
        "dblink_open",
        "dblink_fetch",
        "dblink_send_query",
        "dblink_get_result",
    }
)

# Functions that carry their arguments out of band (a setting read back later, a NOTIFY
# payload, a large object): anywhere in a statement, their flow is not traced.
_SIDE_CHANNEL_FUNCTIONS = frozenset(
    {
        "set_config",
        "pg_notify",
        "lo_from_bytea",
        "lo_put",
        "lowrite",
        "lo_import",
        "pg_logical_emit_message",
        "pg_file_write",
    }
)

# Keywords that sqlglot leaves as column references (only when unquoted and unresolved).
_NILADIC = frozenset(
    {
        "current_user",
        "session_user",
        "system_user",
        "user",
        "current_role",
        "current_catalog",
        "current_schema",
        "current_date",
        "current_time",
        "current_timestamp",
        "localtime",
        "localtimestamp",
        "default",
    }
)

# Set-returning functions whose number of output columns does not depend on argument types.
_SCALAR_SRFS = frozenset(
    {
        "generate_series",
        "generate_subscripts",
        "regexp_matches",
        "regexp_split_to_table",
        "string_to_table",
        "json_array_elements",
        "json_array_elements_text",
        "jsonb_array_elements",
        "jsonb_array_elements_text",
        "json_object_keys",
        "jsonb_object_keys",
        "jsonb_path_query",
    }
)
_KEY_VALUE_SRFS = frozenset({"json_each", "json_each_text", "jsonb_each", "jsonb_each_text"})

# Where an identifier inside an expression is a name, not a reference.
_NAMING_PARENTS = (
    exp.Alias,
    exp.TableAlias,
    exp.Dot,
    exp.XMLElement,
    exp.DataType,
    exp.DataTypeParam,
    exp.ColumnDef,
)
_QUERY_TYPES = (exp.Select, exp.SetOperation, exp.Values, exp.Subquery)
_DML_TYPES = (exp.Insert, exp.Update, exp.Delete, exp.Merge)
_NO_DATA_TYPES = (exp.Transaction, exp.Commit, exp.Rollback, exp.Set, exp.Drop, exp.TruncateTable)

# Work allowed per statement, in nodes visited: linear in its size, with room for recursive
# WITH (evaluated until it settles) but not for nesting crafted to make that explode.
_BUDGET_BASE = 200_000
_BUDGET_PER_NODE = 50
# The walk reads sqlglot >= 28 argument names (`from_`, `with_`); with older versions every
# FROM clause would look empty, so they are refused outright.
_SQLGLOT_OK = "from_" in exp.Select.arg_types and "with_" in exp.Select.arg_types
_LEADING_NOISE = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.S)
_FIRST_WORD = re.compile(r"[A-Za-z_]+")
_CALL_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z_0-9]*)\s*\(")


class LineageUnknown(Exception):
    """Lineage could not be established; the message says why (shown to the agent)."""


@dataclass(frozen=True)
class Lineage:
    """What a statement's values derive from."""

    outputs: tuple[frozenset[Column], ...]
    """Per output column of the statement's result, in order: the base columns its value
    derives from (empty for statements without a result)."""
    writes_from: frozenset[Column] = _NONE
    """Base columns whose values flow into a write (a table, a view definition, a file)."""


def lineage(sql: str, schema: Schema, search_path: Sequence[str] = ("public",)) -> Lineage:
    """Lineage of ONE PostgreSQL statement. Raises LineageUnknown when it cannot be analysed."""
    if not _SQLGLOT_OK:
        raise LineageUnknown("lineage needs sqlglot 30 or later")
    try:
        if _first_keyword(sql) in ("explain", "declare", "prepare", "copy"):
            return _utility(sql, schema, search_path)
        try:
            trees = [t for t in sqlglot.parse(sql, read="postgres") if t is not None]
        except SqlglotError as e:
            raise LineageUnknown(f"statement could not be parsed: {_short(e)}") from None
        if len(trees) != 1:
            raise LineageUnknown("expected exactly one statement")
        return _Analyzer(schema, search_path).statement(trees[0])
    except LineageUnknown:
        raise
    except RecursionError:
        raise LineageUnknown("statement is nested too deeply") from None
    except Exception as e:  # an sqlglot tree this module does not expect: fail closed
        raise LineageUnknown(f"statement could not be analysed ({type(e).__name__})") from e


def _short(error: BaseException) -> str:
    lines = str(error).splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


def _first_keyword(sql: str) -> str:
    noise = _LEADING_NOISE.match(sql)
    word = _FIRST_WORD.match(sql, noise.end() if noise else 0)
    return word.group(0).lower() if word else ""


def _utility(sql: str, schema: Schema, search_path: Sequence[str]) -> Lineage:
    """EXPLAIN, DECLARE CURSOR, PREPARE and COPY, which sqlglot parses as commands or only in
    part: pglast parses them, and a statement inside is deparsed and analysed on its own."""
    try:
        stmts = pglast.parse_sql(sql)
    except ParseError as e:
        raise LineageUnknown(f"statement could not be parsed: {_short(e)}") from None
    if len(stmts) != 1:
        raise LineageUnknown("expected exactly one statement")
    stmt = stmts[0].stmt
    if isinstance(stmt, pglast.ast.CopyStmt):
        return _copy(stmt, schema, search_path)
    query = getattr(stmt, "query", None)
    if not isinstance(query, pglast.ast.Node):
        raise LineageUnknown("statement could not be analysed")
    if isinstance(stmt, pglast.ast.ExplainStmt):
        # The plan carries no values; with ANALYZE the statement runs, so its writes count.
        if not any(_option_on(opt, "analyze") for opt in stmt.options or ()):
            return Lineage(())
        return Lineage((), lineage(RawStream()(query), schema, search_path).writes_from)
    if isinstance(stmt, (pglast.ast.DeclareCursorStmt, pglast.ast.PrepareStmt)):
        return lineage(RawStream()(query), schema, search_path)  # what FETCH/EXECUTE return
    raise LineageUnknown(f"{type(stmt).__name__} statements are not analysed")


def _copy(stmt: pglast.ast.CopyStmt, schema: Schema, search_path: Sequence[str]) -> Lineage:
    """COPY ... TO STDOUT returns rows; TO a file or program writes them; FROM reads values
    from outside the database (no lineage)."""
    if stmt.is_from:
        return Lineage(())
    if isinstance(stmt.query, pglast.ast.Node):
        inner = lineage(RawStream()(stmt.query), schema, search_path)
        outputs, writes = inner.outputs, inner.writes_from
    elif isinstance(stmt.relation, pglast.ast.RangeVar):
        # pglast folds names as PostgreSQL does: they are used as they come
        relation = stmt.relation
        analyzer = _Analyzer(schema, search_path)
        table = exp.Table(this=exp.to_identifier(relation.relname, quoted=True))
        if relation.schemaname:
            table.set("db", exp.to_identifier(relation.schemaname, quoted=True))
        rel = analyzer.base_rel(analyzer.resolve_table(table))
        columns = rel.expand()
        if stmt.attlist:
            columns = []
            for attribute in stmt.attlist:
                name = str(getattr(attribute, "sval", ""))
                cols = rel.lookup(name)
                if cols is None:
                    raise LineageUnknown(f"column {name} of {rel.label} is not known")
                columns.append((name, cols))
        outputs, writes = tuple(c for _, c in columns), _NONE
    else:
        raise LineageUnknown("COPY could not be analysed")
    if stmt.filename is None and not stmt.is_program:  # TO STDOUT
        return Lineage(outputs, writes)
    return Lineage((), _union(outputs) | writes)


def _option_on(option: object, name: str) -> bool:
    if not isinstance(option, pglast.ast.DefElem) or option.defname != name:
        return False
    arg = option.arg
    if arg is None:
        return True
    value = getattr(arg, "sval", getattr(arg, "ival", getattr(arg, "boolval", None)))
    return str(value).lower() not in ("false", "off", "0")


@dataclass
class _Rel:
    """A relation visible in a scope: a table, CTE, derived table or function in FROM."""

    label: str
    columns: _Outputs | None
    """Output columns in order; None when their number is unknown (a function in FROM)."""
    whole: _Cols
    """Everything the relation's values derive from (whole-row references)."""
    placeholder: bool = False
    """A recursive CTE during the first round of its fixpoint."""
    any_name: bool = False
    """A function in FROM: any column name resolves to `whole` (every column derives from
    all arguments, and sqlglot does not know the names of a function's columns)."""

    @classmethod
    def of(cls, label: str, columns: _Outputs) -> _Rel:
        return cls(label, columns, _union(c for _, c in columns))

    def named(self, name: str) -> _Cols | None:
        """The column(s) with exactly this name."""
        found = [cols for col, cols in self.columns or [] if col == name]
        return _union(found) if found else None

    def lookup(self, name: str) -> _Cols | None:
        """A qualified reference `alias.name`."""
        found = self.named(name)
        if found is None and (self.columns is None or self.any_name):
            return self.whole
        return found

    def star(self) -> _Outputs | None:
        """The columns `*` stands for; None when unknown."""
        return [] if self.placeholder else self.columns

    def expand(self) -> _Outputs:
        columns = self.star()
        if columns is None:
            raise LineageUnknown(f"cannot expand * over {self.label}: its columns are not known")
        return list(columns)


@dataclass
class _Scope:
    """The FROM items of one query level; `parent` is the enclosing level (correlation)."""

    parent: _Scope | None
    rels: dict[str, _Rel] = field(default_factory=dict)
    ctes: dict[str, _Rel] = field(default_factory=dict)
    star: _Outputs | None = field(default_factory=list)
    """What `*` stands for (JOIN ... USING merged), None when unknown."""

    def add(self, alias: str, rel: _Rel) -> None:
        if alias in self.rels:
            raise LineageUnknown(f"table name {alias} specified more than once")
        self.rels[alias] = rel

    def find_rel(self, name: str) -> _Rel | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.rels:
                return scope.rels[name]
            scope = scope.parent
        return None

    def find_cte(self, name: str) -> _Rel | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.ctes:
                return scope.ctes[name]
            scope = scope.parent
        return None


def _union(sets: Iterable[_Cols]) -> _Cols:
    out: set[Column] = set()
    for s in sets:
        out |= s
    return frozenset(out)


def _concat(parts: Iterable[_Outputs | None]) -> _Outputs | None:
    out: _Outputs = []
    for part in parts:
        if part is None:
            return None
        out.extend(part)
    return out


def _renamed(outputs: _Outputs, alias: object) -> _Outputs:
    """Apply a column alias list (`AS t(a, b)`) to the first outputs."""
    if not isinstance(alias, exp.TableAlias) or not alias.columns:
        return outputs
    names = [c.name for c in alias.columns]
    if len(names) > len(outputs):
        raise LineageUnknown(f"{alias.name or 'relation'} has more column aliases than columns")
    return [(names[i] if i < len(names) else n, c) for i, (n, c) in enumerate(outputs)]


def _is_comma(join: exp.Expr) -> bool:
    return not any(join.args.get(k) for k in ("kind", "side", "on", "using", "method"))


def _joined(left: _Outputs | None, right: _Outputs | None, join: exp.Expr) -> _Outputs | None:
    """The columns of `left JOIN right`: with USING or NATURAL, the merged columns first
    (deriving from both sides), then the rest of left, then the rest of right."""
    if left is None or right is None:
        return None
    natural = str(join.args.get("method") or "").upper() == "NATURAL"
    using = join.args.get("using") or []
    if natural:
        right_names = {n for n, _ in right}
        merged = list(dict.fromkeys(n for n, _ in left if n in right_names))
    elif using:
        merged = [u.name for u in using]
    else:
        return left + right
    columns = [(n, _union(c for m, c in left + right if m == n)) for n in merged]
    rest = [(n, c) for n, c in left + right if n not in merged]
    return columns + rest


def _cte_visible(table: exp.Table, name: str) -> bool:
    """Whether an unqualified relation name refers to a CTE in scope (PostgreSQL rules)."""
    child: exp.Expr = table
    node = table.parent
    while node is not None:
        if isinstance(node, exp.With) and isinstance(child, exp.CTE):
            ctes = list(node.expressions)
            visible = ctes if node.args.get("recursive") else ctes[: ctes.index(child)]
            if any(cte.alias_or_name == name for cte in visible):
                return True
        else:
            with_ = node.args.get("with_")
            if (
                isinstance(with_, exp.With)
                and child is not with_
                and any(cte.alias_or_name == name for cte in with_.expressions)
            ):
                return True
        child, node = node, node.parent
    return False


def _function_name(func: exp.Expr) -> str:
    if isinstance(func, exp.Anonymous):
        return str(func.name).lower()
    if isinstance(func, (exp.ExplodingGenerateSeries, exp.GenerateSeries)):
        return "generate_series"
    if isinstance(func, exp.Unnest):
        return "unnest"
    match = _CALL_NAME.match(func.sql(dialect="postgres"))
    return match.group(1).lower() if match else func.key


def _output_name(projection: exp.Expr) -> str:
    """The column name PostgreSQL gives a select-list item (close enough for lookups; an
    unexpected name makes a reference fail, never resolve elsewhere)."""
    if isinstance(projection, exp.Alias):
        return projection.alias
    node = projection
    while isinstance(node, (exp.Cast, exp.Paren, exp.Window)):
        node = node.this
    if isinstance(node, exp.Column) and not isinstance(node.this, exp.Star):
        return node.name
    if isinstance(node, exp.Dot) and isinstance(node.expression, exp.Identifier):
        return node.expression.name
    if isinstance(node, exp.Func):
        return _function_name(node)
    return "?column?"


class _Analyzer:
    def __init__(self, schema: Schema, search_path: Sequence[str]) -> None:
        self.schema = schema
        path = [s for s in search_path if s in schema]
        # PostgreSQL searches pg_catalog first unless the path lists it.
        if "pg_catalog" in schema and "pg_catalog" not in search_path:
            path.insert(0, "pg_catalog")
        self.path = path
        self.writes: set[Column] = set()
        self.budget = _BUDGET_BASE
        self.into = False

    # -- statements ---------------------------------------------------------------------------

    def statement(self, tree: exp.Expr) -> Lineage:
        if isinstance(tree, exp.Command):
            raise LineageUnknown(f"{str(tree.name).upper()} statements are not analysed")
        if isinstance(tree, _NO_DATA_TYPES):
            return Lineage(())
        if isinstance(tree, exp.Create):
            return self._create(tree)
        if isinstance(tree, _QUERY_TYPES + _DML_TYPES):
            outputs = self._analyse(tree)
            if self.into:  # SELECT INTO creates and fills a table
                return Lineage((), _union(c for _, c in outputs) | self.writes)
            return Lineage(tuple(c for _, c in outputs), frozenset(self.writes))
        raise LineageUnknown(f"{tree.key.upper()} statements are not analysed")

    def _create(self, tree: exp.Create) -> Lineage:
        kind = str(tree.args.get("kind") or "").upper()
        query = tree.expression
        if isinstance(query, _QUERY_TYPES) and kind in ("TABLE", "VIEW"):
            # CREATE TABLE AS / [MATERIALIZED] VIEW: the new relation holds (or will hand out)
            # the query's values, even WITH NO DATA (REFRESH fills it later).
            outputs = self._analyse(query.copy())
            return Lineage((), _union(c for _, c in outputs) | self.writes)
        if query is None and kind in ("TABLE", "INDEX", "SCHEMA", "SEQUENCE"):
            return Lineage(())
        raise LineageUnknown(f"CREATE {kind or 'statement'} is not analysed")

    # -- preparation: names, search_path ----------------------------------------------------

    def _analyse(self, root: exp.Expr) -> _Outputs:
        root = normalize_identifiers(root, dialect="postgres")
        size = 0
        tables: list[exp.Table] = []
        targets: set[int] = set()  # written relations are never CTEs
        for node in root.walk():
            size += 1
            if isinstance(node, exp.Select) and node.args.get("into"):
                self.into = True
            elif isinstance(node, exp.Func):
                # sqlglot has no typed node for these: they parse as Anonymous (or, should
                # one appear, a Func whose SQL name is theirs)
                func = node.name if isinstance(node, exp.Anonymous) else node.sql_name()
                name = str(func).lower()
                if name in SQL_TEXT_FUNCTIONS:
                    raise LineageUnknown(f"{name}() runs SQL given as text; its lineage is unknown")
                if name in _SIDE_CHANNEL_FUNCTIONS:
                    raise LineageUnknown(f"{name}() passes values out of band; it is not traced")
            elif isinstance(node, _DML_TYPES):
                target = node.this.this if isinstance(node.this, exp.Schema) else node.this
                targets.add(id(target))
            elif (
                isinstance(node, exp.Table)
                and isinstance(node.this, exp.Identifier)  # not a function in FROM
                and not isinstance(node.parent, exp.Into)  # SELECT INTO's new table
            ):
                tables.append(node)
        self.budget = _BUDGET_BASE + _BUDGET_PER_NODE * size
        for table in tables:
            if table.args.get("catalog"):
                table.set("catalog", None)  # PostgreSQL only allows the current database
            if table.db or id(table) in targets or not _cte_visible(table, table.name):
                self.resolve_table(table)
        return self._query(root, None)

    def resolve_table(self, table: exp.Table) -> tuple[str, str]:
        """Schema-qualify a relation by the search_path; it must be in the schema."""
        name = table.name
        db = table.db
        if db:
            if name not in self.schema.get(db, {}):
                raise LineageUnknown(f"relation {db}.{name} is not known")
            return db, name
        for candidate in self.path:
            if name in self.schema[candidate]:
                table.set("db", exp.to_identifier(candidate, quoted=True))
                return candidate, name
        raise LineageUnknown(f"relation {name} is not known")

    def base_rel(self, key: tuple[str, str]) -> _Rel:
        db, name = key
        cols = [(c, frozenset({(db, name, c)})) for c in self.schema[db][name]]
        return _Rel.of(f"{db}.{name}", cols)

    # -- queries ----------------------------------------------------------------------------

    def _with_scope(self, node: exp.Expr, scope: _Scope | None) -> _Scope | None:
        with_ = node.args.get("with_")
        if not isinstance(with_, exp.With):
            return scope
        inner = _Scope(parent=scope)
        ctes = [cte for cte in with_.expressions if isinstance(cte, exp.CTE)]
        if not with_.args.get("recursive"):
            for cte in ctes:
                outputs = _renamed(self._query(cte.this, inner), cte.args.get("alias"))
                inner.ctes[cte.alias_or_name] = _Rel.of(cte.alias_or_name, outputs)
            return inner
        for cte in ctes:
            placeholder = _Rel(cte.alias_or_name, None, _NONE, placeholder=True, any_name=True)
            inner.ctes[cte.alias_or_name] = placeholder
        for _ in range(50):  # lineage only grows, so this settles
            changed = False
            for cte in ctes:
                outputs = _renamed(self._query(cte.this, inner), cte.args.get("alias"))
                rel = _Rel.of(cte.alias_or_name, outputs)
                if rel != inner.ctes[cte.alias_or_name]:
                    inner.ctes[cte.alias_or_name] = rel
                    changed = True
            if not changed:
                return inner
        raise LineageUnknown("recursive WITH did not settle")

    def _spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise LineageUnknown("statement is too complex to analyse")

    def _query(self, node: exp.Expr, scope: _Scope | None) -> _Outputs:
        self._spend()
        scope = self._with_scope(node, scope)
        if isinstance(node, exp.Subquery):
            return self._query(node.this, scope)
        if isinstance(node, exp.Select):
            return self._select(node, scope)
        if isinstance(node, exp.SetOperation):
            left = self._query(node.left, scope)
            right = self._query(node.right, scope)
            if len(left) != len(right):
                raise LineageUnknown(f"{node.key.upper()} branches have different column counts")
            return [(n, a | b) for (n, a), (_, b) in zip(left, right, strict=True)]
        if isinstance(node, exp.Values):
            return self._values(node, scope)
        if isinstance(node, exp.Insert):
            return self._insert(node, scope)
        if isinstance(node, exp.Update):
            return self._update(node, scope)
        if isinstance(node, exp.Delete):
            return self._delete(node, scope)
        if isinstance(node, exp.Merge):
            return self._merge(node, scope)
        raise LineageUnknown(f"unsupported query construct: {node.key}")

    def _values(self, node: exp.Values, scope: _Scope | None) -> _Outputs:
        local = _Scope(parent=scope)
        per_column: list[set[Column]] | None = None
        for row in node.expressions:
            items = list(row.expressions) if isinstance(row, exp.Tuple) else [row]
            if per_column is None:
                per_column = [set() for _ in items]
            if len(items) != len(per_column):
                raise LineageUnknown("VALUES lists must all be the same length")
            for i, item in enumerate(items):
                per_column[i] |= self._expr(item, local)
        return [(f"column{i + 1}", frozenset(c)) for i, c in enumerate(per_column or [])]

    def _select(self, node: exp.Select, parent: _Scope | None) -> _Outputs:
        scope = _Scope(parent=parent)
        from_ = node.args.get("from_")
        if isinstance(from_, exp.From):
            scope.star = self._add_joined(from_.this, node.args.get("joins") or [], scope)
        outputs: _Outputs = []
        for projection in node.expressions:
            outputs.extend(self._projection(projection, scope))
        return outputs

    def _projection(self, projection: exp.Expr, scope: _Scope) -> _Outputs:
        node = projection.this if isinstance(projection, exp.Alias) else projection
        if isinstance(node, exp.Star):
            if scope.star is None:
                raise LineageUnknown("cannot expand *: the columns of a function are not known")
            return list(scope.star)
        if isinstance(node, exp.Column) and isinstance(node.this, exp.Star):
            star = scope.find_rel(node.table)
            if star is None:
                raise LineageUnknown(f"missing FROM-clause entry for table {node.table}")
            return star.expand()
        if isinstance(node, exp.Dot) and isinstance(node.expression, exp.Star):  # (c).*
            inner = node.this
            while isinstance(inner, exp.Paren):
                inner = inner.this
            whole = self._whole_row_rel(inner, scope)
            if whole is None:
                raise LineageUnknown("(expression).* could not be expanded")
            return whole.expand()
        return [(_output_name(projection), self._expr(node, scope))]

    def _whole_row_rel(self, node: exp.Expr, scope: _Scope) -> _Rel | None:
        """The relation a whole-row reference names (`c`, `c.*`), if it is one."""
        if isinstance(node, exp.TableColumn):
            return scope.find_rel(node.name)
        if not isinstance(node, exp.Column):
            return None
        if isinstance(node.this, exp.Star):
            return scope.find_rel(node.table)
        if node.table or self._column_in_scope(node.name, scope):
            return None
        return scope.find_rel(node.name)

    # -- FROM items -------------------------------------------------------------------------

    def _add_joined(
        self, first: exp.Expr, joins: Sequence[exp.Expr], scope: _Scope
    ) -> _Outputs | None:
        """Add `first` and its joins; return what `*` stands for over them. JOIN binds
        tighter than a comma, so USING/NATURAL merges within comma-separated segments."""
        segments = [self._add_source(first, scope)]
        for join in joins:
            if not isinstance(join, exp.Join):
                raise LineageUnknown(f"unsupported join: {join.key}")
            columns = self._add_source(join.this, scope)
            if _is_comma(join):
                segments.append(columns)
            else:
                segments[-1] = _joined(segments[-1], columns, join)
        return _concat(segments)

    def _add_source(self, item: exp.Expr, scope: _Scope) -> _Outputs | None:
        """Add one FROM item (and the joins sqlglot hangs on it); return its `*` columns."""
        alias = item.args.get("alias")
        joins = item.args.get("joins") or []
        if isinstance(item, exp.Table):
            inner = item.this
            if isinstance(inner, exp.Identifier):
                if item.db:
                    rel = self.base_rel((item.db, item.name))
                else:
                    cte = scope.find_cte(item.name)
                    if cte is None:
                        raise LineageUnknown(f"relation {item.name} is not known")
                    rel = cte
                if rel.columns is not None:
                    rel = _Rel.of(rel.label, _renamed(rel.columns, alias))
                scope.add(item.alias_or_name, rel)
            elif isinstance(inner, exp.Func):
                ordinality = bool(item.args.get("ordinality"))
                rel = self._function_rel([inner], alias, scope, ordinality=ordinality)
            elif inner is None and item.args.get("rows_from"):
                funcs = [f.this if isinstance(f, exp.Table) else f for f in item.args["rows_from"]]
                if not all(isinstance(f, exp.Func) for f in funcs):
                    raise LineageUnknown("unsupported ROWS FROM item")
                ordinality = bool(item.args.get("ordinality"))
                rel = self._function_rel(funcs, alias, scope, ordinality=ordinality)
            else:
                raise LineageUnknown("unsupported FROM item")
            own = rel.star()
        elif isinstance(item, exp.Subquery) and isinstance(item.this, exp.Table):
            # (a JOIN b ON ...) [AS j]: the joined items stay visible (PostgreSQL hides them
            # behind an alias; seeing more can only over-approximate)
            own = self._add_source(item.this, scope)
            if isinstance(alias, exp.TableAlias) and alias.name:
                if own is None:
                    rel = _Rel(alias.name, None, _union(r.whole for r in scope.rels.values()))
                else:
                    rel = _Rel.of(alias.name, _renamed(own, alias))
                scope.add(alias.name, rel)
                own = rel.star()
        elif isinstance(item, (exp.Subquery, exp.Values)):
            # a derived table sees the enclosing query, not its FROM siblings
            outputs = _renamed(self._query(item, scope.parent), alias)
            name = item.alias_or_name or ("*VALUES*" if isinstance(item, exp.Values) else "")
            rel = _Rel.of(name or "subquery", outputs)
            scope.add(name, rel)
            own = rel.star()
        elif isinstance(item, exp.Lateral):
            inner = item.this
            if isinstance(inner, exp.Subquery):
                outputs = _renamed(self._query(inner, scope), alias)
                name = item.alias_or_name or inner.alias_or_name
                rel = _Rel.of(name or "LATERAL subquery", outputs)
                scope.add(name, rel)
            elif isinstance(inner, exp.Func):
                ordinality = bool(item.args.get("ordinality"))
                rel = self._function_rel([inner], alias, scope, ordinality=ordinality)
            else:
                raise LineageUnknown("unsupported LATERAL item")
            own = rel.star()
        elif isinstance(item, exp.Unnest):
            ordinality = bool(item.args.get("offset"))
            rel = self._function_rel([item], alias, scope, ordinality=ordinality)
            own = rel.star()
        else:
            raise LineageUnknown(f"unsupported FROM item: {item.key}")
        if joins:
            segments = [own]
            for join in joins:
                columns = self._add_source(join.this, scope)
                if _is_comma(join):
                    segments.append(columns)
                else:
                    segments[-1] = _joined(segments[-1], columns, join)
            return _concat(segments)
        return own

    def _function_rel(
        self, funcs: Sequence[exp.Expr], alias: object, scope: _Scope, *, ordinality: bool
    ) -> _Rel:
        """A function in FROM (several for ROWS FROM): every column derives from all of the
        arguments (it is LATERAL: they may use earlier FROM items). The number of columns is
        known from a column definition list and for a few built-ins; else `*` over it fails."""
        fname = _function_name(funcs[0]) if len(funcs) == 1 else "rows from"
        derived: set[Column] = set()
        widths: list[int | None] = []
        for func in funcs:
            args = func.copy()
            args.set("alias", None)
            if isinstance(args, exp.Unnest):
                args.set("offset", None)
            derived |= self._expr(args, scope)
            widths.append(self._function_width(func, scope))
        name = fname
        names: list[str] = []
        width = None if None in widths else sum(w or 0 for w in widths)
        if isinstance(alias, exp.TableAlias):
            name = alias.name or fname
            names = [c.name for c in alias.columns]
            if names and all(isinstance(c, exp.ColumnDef) for c in alias.columns):
                width = len(names)  # AS t(a int, b text): the whole record
        label = f"function {fname}()"
        if width is None:
            rel = _Rel(label, None, frozenset(derived), any_name=True)
        else:
            width += 1 if ordinality else 0
            if len(names) > width:
                raise LineageUnknown(f"{fname}() has more column aliases than columns")
            names += [name] * (width - len(names))
            whole = frozenset(derived)
            rel = _Rel(label, [(n, whole) for n in names], whole, any_name=True)
        scope.add(name, rel)
        return rel

    def _function_width(self, func: exp.Expr, scope: _Scope) -> int | None:
        """How many columns a function in FROM returns, if that does not depend on types."""
        fname = _function_name(func)
        if fname in _SCALAR_SRFS:
            return 1
        if fname in _KEY_VALUE_SRFS:
            return 2
        if fname != "unnest":
            return None
        # unnest(a, b, ...) returns one column per array, unless an array holds rows: then
        # one per field. Anything that may yield rows makes the width unknown.
        for node in func.walk():
            if isinstance(node, (*_QUERY_TYPES, exp.Star, exp.TableColumn)):
                return None
            if isinstance(node, exp.Column) and self._whole_row_rel(node, scope) is not None:
                return None
            if isinstance(node, exp.DataType) and node.this == exp.DataType.Type.USERDEFINED:
                return None
        return len(func.expressions)

    # -- expressions ------------------------------------------------------------------------

    def _expr(self, node: exp.Expr, scope: _Scope) -> _Cols:
        found: set[Column] = set()
        stack: list[exp.Expr] = [node]
        while stack:
            current = stack.pop()
            self._spend()
            if isinstance(current, exp.Column):
                found |= self._column(current, scope)
            elif isinstance(current, exp.TableColumn):  # a whole-row reference
                rel = scope.find_rel(current.name)
                if rel is None:
                    raise LineageUnknown(f"{current.name} could not be resolved")
                found |= rel.whole
            elif isinstance(current, exp.Identifier):
                # Names that are not references (aliases, field and element names, types).
                # Anywhere else a name could be a reference this walk does not understand.
                if not isinstance(current.parent, _NAMING_PARENTS):
                    parent = current.parent.key if current.parent else "nothing"
                    raise LineageUnknown(f"unsupported name {current.name} in {parent}")
            elif isinstance(current, _QUERY_TYPES):
                for _, cols in self._query(current, scope):
                    found |= cols
            elif isinstance(current, (exp.Window, exp.Filter, exp.Collate)):
                # Only the value: PARTITION BY / ORDER BY / FILTER pick rows, COLLATE names.
                stack.append(current.this)
            elif isinstance(current, exp.Star):
                if not isinstance(current.parent, exp.Count):
                    for rel in scope.rels.values():
                        found |= rel.whole
            else:
                stack.extend(current.iter_expressions())
        return frozenset(found)

    def _column_in_scope(self, name: str, scope: _Scope) -> bool:
        level: _Scope | None = scope
        while level is not None:
            if any(rel.named(name) is not None for rel in level.rels.values()):
                return True
            level = level.parent
        return False

    def _column(self, column: exp.Column, scope: _Scope) -> _Cols:
        if column.table:
            rel = scope.find_rel(column.table)
            if rel is None:
                raise LineageUnknown(f"missing FROM-clause entry for table {column.table}")
            if isinstance(column.this, exp.Star):
                return rel.whole
            cols = rel.lookup(column.name)
            if cols is None:
                raise LineageUnknown(f"column {column.table}.{column.name} is not known")
            return cols
        if isinstance(column.this, exp.Star):
            return _union(rel.whole for rel in scope.rels.values())
        name = column.name
        matched = False
        out: set[Column] = set()
        level: _Scope | None = scope
        while level is not None:  # the innermost level with the name wins
            found = [rel.named(name) for rel in level.rels.values()]
            hits = [cols for cols in found if cols is not None]
            for rel in level.rels.values():
                if rel.any_name and rel.named(name) is None:
                    # a function's columns may have other names than sqlglot knows: the name
                    # may be one of them, or belong to an enclosing level
                    out |= rel.whole
                    matched = True
            if hits:  # several are ambiguous in PostgreSQL (or USING-merged): take them all
                out |= _union(hits)
                matched = True
                break
            level = level.parent
        whole = scope.find_rel(name)
        if whole is not None:  # a whole-row reference (also taken if a column matched)
            out |= whole.whole
            matched = True
        if matched:
            return frozenset(out)
        identifier = column.this
        if isinstance(identifier, exp.Identifier) and not identifier.quoted and name in _NILADIC:
            return _NONE
        raise LineageUnknown(f"column {name} could not be resolved")

    # -- data-modifying statements ----------------------------------------------------------

    def _target(self, table: exp.Expr) -> tuple[str, _Rel]:
        if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
            raise LineageUnknown("the target of the statement could not be analysed")
        if not table.db:
            raise LineageUnknown(f"relation {table.name} is not known")
        return table.alias_or_name, self.base_rel((table.db, table.name))

    def _assign(
        self, assignments: Iterable[exp.Expr], scope: _Scope, assigned: dict[str, set[Column]]
    ) -> None:
        """`SET col = expr` / `SET (a, b) = (...)`: every target gets all of the value's
        lineage, which flows into the write."""
        for eq in assignments:
            if not isinstance(eq, exp.EQ):
                raise LineageUnknown(f"unsupported assignment: {eq.key}")
            value = self._expr(eq.expression, scope)
            self.writes |= value
            targets = eq.this.expressions if isinstance(eq.this, exp.Tuple) else [eq.this]
            for target in targets:
                assigned.setdefault(target.name, set()).update(value)

    def _returning(
        self,
        node: exp.Expr,
        scope: _Scope,
        target: tuple[str, _Rel],
        others: _Outputs | None,
        assigned: dict[str, set[Column]],
    ) -> _Outputs:
        """RETURNING sees the written row: each target column derives from itself and from
        what was assigned to it. `*` is the target's columns, then those of FROM/USING."""
        returning = node.args.get("returning")
        if not isinstance(returning, exp.Returning):
            return []
        if returning.args.get("into"):
            raise LineageUnknown("RETURNING INTO is not analysed")
        alias, rel = target
        columns = [(n, c | frozenset(assigned.get(n, ()))) for n, c in rel.columns or []]
        local = _Scope(parent=scope.parent, rels={**scope.rels, alias: _Rel.of(rel.label, columns)})
        local.star = _concat([columns, others])
        outputs: _Outputs = []
        for projection in returning.expressions:
            outputs.extend(self._projection(projection, local))
        return outputs

    def _insert(self, node: exp.Insert, scope: _Scope | None) -> _Outputs:
        into = node.this
        listed: list[str] = []
        if isinstance(into, exp.Schema):
            listed = [c.name for c in into.expressions]
            into = into.this
        target = self._target(into)
        alias, rel = target
        names = listed or [n for n, _ in rel.columns or []]
        assigned: dict[str, set[Column]] = {}
        if node.expression is not None:
            values = self._query(node.expression, scope)
            if len(values) > len(names):
                raise LineageUnknown("INSERT has more expressions than target columns")
            for name, (_, cols) in zip(names, values, strict=False):
                assigned.setdefault(name, set()).update(cols)
                self.writes |= cols
        local = _Scope(parent=scope)
        local.add(alias, rel)
        conflict = node.args.get("conflict")
        if isinstance(conflict, exp.OnConflict) and conflict.expressions:
            excluded = [(n, frozenset(assigned.get(n, ()))) for n, _ in rel.columns or []]
            local.add("excluded", _Rel.of("excluded", excluded))
            self._assign(conflict.expressions, local, assigned)
            del local.rels["excluded"]
        return self._returning(node, local, target, [], assigned)

    def _update(self, node: exp.Update, scope: _Scope | None) -> _Outputs:
        local = _Scope(parent=scope)
        from_ = node.args.get("from_")
        others: _Outputs | None = []
        if isinstance(from_, exp.From):
            others = self._add_joined(from_.this, node.args.get("joins") or [], local)
        target = self._target(node.this)
        local.add(*target)
        assigned: dict[str, set[Column]] = {}
        self._assign(node.expressions, local, assigned)
        return self._returning(node, local, target, others, assigned)

    def _delete(self, node: exp.Delete, scope: _Scope | None) -> _Outputs:
        local = _Scope(parent=scope)
        others = _concat(self._add_source(item, local) for item in node.args.get("using") or [])
        target = self._target(node.this)
        local.add(*target)
        return self._returning(node, local, target, others, {})

    def _merge(self, node: exp.Merge, scope: _Scope | None) -> _Outputs:
        local = _Scope(parent=scope)
        others = self._add_source(node.args["using"], local)
        target = self._target(node.this)
        local.add(*target)
        names = [n for n, _ in target[1].columns or []]
        assigned: dict[str, set[Column]] = {}
        whens = node.args.get("whens")
        for when in whens.expressions if isinstance(whens, exp.Whens) else []:
            then = when.args.get("then")
            if isinstance(then, exp.Update):
                self._assign(then.expressions, local, assigned)
            elif isinstance(then, exp.Insert):
                columns = then.this
                targets = [c.name for c in columns.expressions] if columns else names
                values = then.expression
                if values is not None and not isinstance(values, exp.Tuple):
                    raise LineageUnknown("MERGE INSERT could not be analysed")
                items = values.expressions if values is not None else []
                if len(items) > len(targets):
                    raise LineageUnknown("MERGE INSERT has more expressions than target columns")
                for name, item in zip(targets, items, strict=False):
                    cols = self._expr(item, local)
                    assigned.setdefault(name, set()).update(cols)
                    self.writes |= cols
            elif not isinstance(then, exp.Var):  # DELETE, DO NOTHING
                raise LineageUnknown("MERGE action could not be analysed")
        return self._returning(node, local, target, others, assigned)
