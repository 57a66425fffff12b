"""Named schema migrations, applied in order at start (never at import).

Add a migration by appending to MIGRATIONS; never edit one that has shipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from storage.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_accounts_and_chats",
        """
        CREATE TABLE departments (
            id          VARCHAR PRIMARY KEY,          -- short slug: finance, hr
            name        VARCHAR NOT NULL,
            created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE SEQUENCE users_id_seq;
        CREATE TABLE users (
            id             BIGINT PRIMARY KEY DEFAULT nextval('users_id_seq'),
            username       VARCHAR NOT NULL UNIQUE,
            display_name   VARCHAR NOT NULL,
            password_hash  VARCHAR NOT NULL,          -- scrypt, salted; see webapp/auth.py
            role           VARCHAR NOT NULL CHECK (role IN ('employee', 'reviewer', 'admin')),
            -- no REFERENCES: DuckDB rewrites an updated FK column as delete + insert, which
            -- fails while other tables reference the user; moving a user must stay possible.
            -- storage.accounts checks the department exists.
            department_id  VARCHAR NOT NULL,
            disabled       BOOLEAN NOT NULL DEFAULT false,
            created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE SEQUENCE conversations_id_seq;
        CREATE TABLE conversations (
            id             BIGINT PRIMARY KEY DEFAULT nextval('conversations_id_seq'),
            user_id        BIGINT NOT NULL REFERENCES users(id),
            department_id  VARCHAR NOT NULL REFERENCES departments(id),
            title          VARCHAR NOT NULL,
            created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp,
            updated_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE INDEX conversations_user_idx ON conversations(user_id);
        CREATE SEQUENCE messages_id_seq;
        CREATE TABLE messages (
            id                 BIGINT PRIMARY KEY DEFAULT nextval('messages_id_seq'),
            conversation_id    BIGINT NOT NULL REFERENCES conversations(id),
            role               VARCHAR NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
            content            VARCHAR NOT NULL,
            thinking           VARCHAR,               -- Qwen3 <think> text: logged, never shown
            model              VARCHAR,               -- base model that answered
            adapter            VARCHAR,               -- LoRA adapter name (department), NULL = base
            adapter_version    VARCHAR,
            latency_ms         DOUBLE,                -- whole answer
            ttft_ms            DOUBLE,                -- time to first token
            prompt_tokens      INTEGER,
            completion_tokens  INTEGER,
            finish_reason      VARCHAR,               -- stop, length, cancelled, error
            error              VARCHAR,
            created_at         TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE INDEX messages_conversation_idx ON messages(conversation_id);
        CREATE SEQUENCE feedback_id_seq;
        CREATE TABLE feedback (
            id          BIGINT PRIMARY KEY DEFAULT nextval('feedback_id_seq'),
            message_id  BIGINT NOT NULL REFERENCES messages(id),
            user_id     BIGINT NOT NULL REFERENCES users(id),
            rating      SMALLINT NOT NULL CHECK (rating IN (-1, 1)),   -- -1 thumbs down, 1 up
            comment     VARCHAR,
            created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
            updated_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
            UNIQUE (message_id, user_id)
        );
        """,
    ),
    Migration(
        "0002_tool_calls",
        """
        ALTER TABLE messages ADD COLUMN tool_call_id VARCHAR;   -- on role='tool': the call it answers
        CREATE SEQUENCE tool_calls_id_seq;
        CREATE TABLE tool_calls (
            id               BIGINT PRIMARY KEY DEFAULT nextval('tool_calls_id_seq'),
            -- No REFERENCES on this append-only audit log: DuckDB's foreign-key checks
            -- doubled the cost of every tool round (bench/tool_overhead.py).
            call_id          VARCHAR NOT NULL,        -- one call; several rows when retried
            message_id       BIGINT,                  -- the assistant message that asked
            conversation_id  BIGINT,
            user_id          BIGINT NOT NULL,
            department_id    VARCHAR NOT NULL,
            tool             VARCHAR NOT NULL,
            arguments        VARCHAR NOT NULL,        -- JSON, as validated (or as sent when invalid)
            status           VARCHAR NOT NULL CHECK (status IN
                             ('ok', 'error', 'denied', 'invalid', 'timeout', 'declined', 'pending')),
            attempt          INTEGER NOT NULL,        -- 1, 2, ... ; 0 for checks before running
            side_effect      BOOLEAN NOT NULL DEFAULT false,
            latency_ms       DOUBLE,
            result           VARCHAR,                 -- what the model was given (truncated)
            error            VARCHAR,
            created_at       TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE INDEX tool_calls_call_idx ON tool_calls(call_id);
        CREATE INDEX tool_calls_conversation_idx ON tool_calls(conversation_id);
        """,
    ),
    Migration(
        "0003_demo_company_systems",
        """
        -- The demo company's own systems, queried by the demo tools with parameters only.
        CREATE TABLE sales (
            month         DATE NOT NULL,              -- first day of the month
            region        VARCHAR NOT NULL,           -- 华东 华南 华北 西南 华中
            product_line  VARCHAR NOT NULL,
            revenue       DECIMAL(14, 2) NOT NULL,    -- CNY
            units         INTEGER NOT NULL,
            PRIMARY KEY (month, region, product_line)
        );
        CREATE TABLE customers (
            id             VARCHAR PRIMARY KEY,       -- C001
            name           VARCHAR NOT NULL,
            region         VARCHAR NOT NULL,
            industry       VARCHAR NOT NULL,
            account_owner  VARCHAR NOT NULL,
            annual_revenue DECIMAL(14, 2) NOT NULL,
            customer_since DATE NOT NULL
        );
        CREATE SEQUENCE email_outbox_id_seq;
        CREATE TABLE email_outbox (
            id          BIGINT PRIMARY KEY DEFAULT nextval('email_outbox_id_seq'),
            user_id     BIGINT NOT NULL REFERENCES users(id),
            recipient   VARCHAR NOT NULL,
            subject     VARCHAR NOT NULL,
            body        VARCHAR NOT NULL,
            created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        """,
    ),
    Migration(
        "0004_reviews_and_training_samples",
        """
        -- Which departments a reviewer works on; none listed means their own department.
        CREATE TABLE reviewer_departments (
            user_id        BIGINT NOT NULL,
            department_id  VARCHAR NOT NULL,
            PRIMARY KEY (user_id, department_id)
        );
        CREATE SEQUENCE reviews_id_seq;
        CREATE TABLE reviews (
            id           BIGINT PRIMARY KEY DEFAULT nextval('reviews_id_seq'),
            message_id   BIGINT NOT NULL,             -- the reviewed answer (messages.id)
            reviewer_id  BIGINT NOT NULL,             -- users.id
            decision     VARCHAR NOT NULL CHECK (decision IN ('approved', 'rejected', 'skipped')),
            reason       VARCHAR,                     -- see finetune/samples.py REASONS
            note         VARCHAR,
            created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE INDEX reviews_message_idx ON reviews(message_id);
        CREATE SEQUENCE training_samples_id_seq;
        CREATE TABLE training_samples (
            id                 BIGINT PRIMARY KEY DEFAULT nextval('training_samples_id_seq'),
            department_id      VARCHAR NOT NULL,      -- the adapter it trains
            messages           VARCHAR NOT NULL,      -- JSON list, OpenAI chat format
            tools              VARCHAR,               -- JSON list of the tools offered, or NULL
            split              VARCHAR NOT NULL CHECK (split IN ('train', 'eval')),
            origin             VARCHAR NOT NULL CHECK (origin IN ('correction', 'good_example', 'import')),
            reason             VARCHAR,
            source_message_id  BIGINT,                -- the reviewed answer, for corrections
            review_id          BIGINT,
            reviewer_id        BIGINT,
            fingerprint        VARCHAR NOT NULL,      -- hash of the normalised last question
            near_duplicate_of  BIGINT,                -- an earlier sample asking nearly the same
            created_at         TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE INDEX training_samples_department_idx ON training_samples(department_id);
        """,
    ),
    Migration(
        "0005_training_runs_and_adapter_versions",
        """
        CREATE SEQUENCE training_runs_id_seq;
        CREATE TABLE training_runs (
            id              BIGINT PRIMARY KEY DEFAULT nextval('training_runs_id_seq'),
            department_id   VARCHAR NOT NULL,         -- the adapter refreshed
            trigger         VARCHAR NOT NULL CHECK (trigger IN ('schedule', 'manual', 'cli')),
            status          VARCHAR NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled', 'skipped')),
            reason          VARCHAR,                  -- why it was skipped or failed
            samples         INTEGER,                  -- training samples used
            new_samples     INTEGER,                  -- approved since the last successful run
            last_sample_id  BIGINT,                   -- samples up to this id were available
            steps           INTEGER,
            final_loss      DOUBLE,
            losses          VARCHAR,                  -- JSON list, one per optimizer step
            mode            VARCHAR,                  -- QLoRA on CUDA / plain LoRA on CPU
            version         VARCHAR,                  -- the candidate it produced
            log_path        VARCHAR,
            started_at      TIMESTAMP NOT NULL DEFAULT current_timestamp,
            finished_at     TIMESTAMP
        );
        CREATE TABLE adapter_versions (
            department_id   VARCHAR NOT NULL,
            version         VARCHAR NOT NULL,         -- v1, v2, ...
            status          VARCHAR NOT NULL CHECK (status IN ('candidate', 'active', 'retired', 'rejected')),
            path            VARCHAR NOT NULL,         -- complete adapter folder
            base_model      VARCHAR NOT NULL,
            run_id          BIGINT,
            metrics         VARCHAR,                  -- JSON: evaluation of this version
            gate            VARCHAR,                  -- JSON: the gate's decision against the active one
            canary_share    DOUBLE NOT NULL DEFAULT 0, -- share of conversations a candidate serves
            created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp,
            promoted_at     TIMESTAMP,
            PRIMARY KEY (department_id, version)
        );
        """,
    ),
    Migration(
        "0006_knowledge",
        """
        CREATE SEQUENCE kb_document_ids;
        CREATE SEQUENCE kb_chunk_ids;
        CREATE TABLE kb_documents (
            id              BIGINT PRIMARY KEY DEFAULT nextval('kb_document_ids'),
            source_name     VARCHAR NOT NULL UNIQUE,  -- file name; a re-upload replaces the document
            title           VARCHAR NOT NULL,
            sha256          VARCHAR NOT NULL,         -- of the file: an unchanged re-upload is skipped
            chars           BIGINT NOT NULL,
            company_wide    BOOLEAN NOT NULL,         -- readable by every department
            uploaded_by     BIGINT,
            created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp,
            updated_at      TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        -- who may read a document that is not company-wide (no FK: see users.department_id)
        CREATE TABLE kb_document_departments (
            document_id     BIGINT NOT NULL,
            department_id   VARCHAR NOT NULL,
            PRIMARY KEY (document_id, department_id)
        );
        CREATE TABLE kb_chunks (
            id              BIGINT PRIMARY KEY DEFAULT nextval('kb_chunk_ids'),
            document_id     BIGINT NOT NULL,
            ordinal         INTEGER NOT NULL,         -- position in the document
            location        VARCHAR,                  -- "p. 3" for PDFs
            text            VARCHAR NOT NULL,
            tokens          INTEGER NOT NULL,         -- in the embedding model's tokenizer
            embedding       BLOB NOT NULL             -- float32, L2-normalised
        );
        CREATE INDEX kb_chunks_document ON kb_chunks (document_id);
        -- one row: bumped by every change, so indexes and caches know they are stale
        CREATE TABLE kb_state (
            id              INTEGER PRIMARY KEY CHECK (id = 1),
            version         BIGINT NOT NULL,
            embedding_model VARCHAR                   -- the model the stored embeddings came from
        );
        INSERT INTO kb_state VALUES (1, 0, NULL);
        -- what retrieval gave each message, for reviewers (chunk text may be gone later)
        CREATE TABLE retrievals (
            message_id      BIGINT NOT NULL,          -- auto: the user message; tool: the calling answer
            via             VARCHAR NOT NULL,         -- 'auto' (every turn) or 'tool' (search_knowledge_base)
            rank            INTEGER NOT NULL,
            chunk_id        BIGINT NOT NULL,
            document_id     BIGINT NOT NULL,
            title           VARCHAR NOT NULL,
            location        VARCHAR,
            passage         VARCHAR NOT NULL,         -- the text the model was given
            score           DOUBLE NOT NULL,          -- fused (reciprocal rank fusion)
            dense_score     DOUBLE,                   -- cosine similarity
            lexical_score   DOUBLE,                   -- BM25
            created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE INDEX retrievals_message ON retrievals (message_id);
        CREATE TABLE message_attachments (
            message_id      BIGINT NOT NULL,
            filename        VARCHAR NOT NULL,
            chars           BIGINT NOT NULL,
            tokens          BIGINT NOT NULL,          -- in the chat model's tokenizer
            mode            VARCHAR NOT NULL CHECK (mode IN ('whole', 'passages')),
            prompt_text     VARCHAR NOT NULL          -- what the model was given of it
        );
        """,
    ),
    Migration(
        "0007_response_cache",
        """
        CREATE SEQUENCE cache_entry_ids;
        CREATE TABLE cache_entries (
            id              BIGINT PRIMARY KEY DEFAULT nextval('cache_entry_ids'),
            scope           VARCHAR NOT NULL,         -- hash of department, model, adapter version, KB version, tools
            department_id   VARCHAR NOT NULL,
            question        VARCHAR NOT NULL,
            normalized      VARCHAR NOT NULL,         -- for exact hits: width, case, punctuation, spaces folded
            embedding       BLOB,                     -- float32 of the question, for semantic hits
            answer          VARCHAR NOT NULL,
            sources         VARCHAR,                  -- JSON: the passages the answer was given
            source_message_id BIGINT NOT NULL,        -- the generated answer it replays
            generation_ms   DOUBLE,                   -- what a hit saves
            completion_tokens INTEGER,
            live_tools      BOOLEAN NOT NULL,         -- the answer used tools with live data
            hits            BIGINT NOT NULL DEFAULT 0,
            created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp,
            last_hit_at     TIMESTAMP,
            expires_at      TIMESTAMP NOT NULL,
            evicted_at      TIMESTAMP,
            evicted_reason  VARCHAR                   -- thumbs-down / cleared / size / ...
        );
        CREATE INDEX cache_entries_scope ON cache_entries (scope, normalized);
        CREATE TABLE cache_lookups (
            department_id   VARCHAR NOT NULL,
            outcome         VARCHAR NOT NULL,         -- exact / semantic / miss / guarded (similar, but a guard refused)
            entry_id        BIGINT,
            similarity      DOUBLE,
            lookup_ms       DOUBLE NOT NULL,
            created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        -- what admins change at run time (settings give the first values)
        CREATE TABLE cache_settings (
            id              INTEGER PRIMARY KEY CHECK (id = 1),
            enabled         BOOLEAN NOT NULL,
            semantic        BOOLEAN NOT NULL,
            threshold       DOUBLE NOT NULL
        );
        ALTER TABLE messages ADD COLUMN cache_entry_id BIGINT;  -- answered from this cache entry
        """,
    ),
    Migration(
        "0008_api_keys_and_audit",
        """
        -- Keys for the OpenAI-compatible API. Only a SHA-256 of the key is kept: keys are 32
        -- random bytes, so a fast hash is safe (no dictionary to guess from) and a lookup by
        -- hash needs no scan. The prefix lets people tell their keys apart.
        CREATE SEQUENCE api_keys_id_seq;
        CREATE TABLE api_keys (
            id            BIGINT PRIMARY KEY DEFAULT nextval('api_keys_id_seq'),
            user_id       BIGINT NOT NULL,
            name          VARCHAR NOT NULL,
            key_prefix    VARCHAR NOT NULL,
            key_hash      VARCHAR NOT NULL UNIQUE,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
            last_used_at  TIMESTAMP,
            revoked_at    TIMESTAMP
        );
        -- What admins looked at and exported, key changes, raw completions: who did what.
        CREATE SEQUENCE audit_events_id_seq;
        CREATE TABLE audit_events (
            id             BIGINT PRIMARY KEY DEFAULT nextval('audit_events_id_seq'),
            user_id        BIGINT,
            department_id  VARCHAR,
            action         VARCHAR NOT NULL,          -- audit.search, audit.open, api_key.create, ...
            detail         VARCHAR,                   -- JSON
            created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE INDEX audit_events_action_idx ON audit_events(action);
        """,
    ),
    Migration(
        "0009_cache_lookup_days",
        """
        -- cache lookups older than --cache-lookups-kept-days, as daily totals: the monitoring
        -- figures and the /metrics counters stay what they were when the rows are pruned
        CREATE TABLE cache_lookup_days (
            day             DATE NOT NULL,
            department_id   VARCHAR NOT NULL,
            outcome         VARCHAR NOT NULL,
            lookups         BIGINT NOT NULL,
            lookup_ms_sum   DOUBLE NOT NULL,
            saved_ms        DOUBLE NOT NULL,          -- generation time the hits saved
            saved_tokens    BIGINT NOT NULL,
            PRIMARY KEY (day, department_id, outcome)
        );
        """,
    ),
    Migration(
        "0010_tool_calls_acted_by",
        """
        -- a reviewer fetching a correction's real result runs the tool with the employee's
        -- permissions: user_id is the employee it ran for, acted_by the reviewer who ran it
        ALTER TABLE tool_calls ADD COLUMN acted_by BIGINT;
        """,
    ),
    Migration(
        "0011_tool_calls_overruled",
        """
        -- arguments the user's own words overruled (webapp/tools/grounding.py), as JSON
        -- {parameter: the value the model wrote}: the arguments column holds what ran
        ALTER TABLE tool_calls ADD COLUMN overruled VARCHAR;
        """,
    ),
)


def migrate(db: Database, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet recorded; returns the names applied now."""
    with db.transaction() as cur:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
        )
    done = {row["name"] for row in db.query("SELECT name FROM schema_migrations")}
    applied = []
    for migration in migrations:
        if migration.name in done:
            continue
        with db.transaction() as cur:
            cur.execute(migration.sql)
            cur.execute("INSERT INTO schema_migrations (name) VALUES (?)", [migration.name])
        log.info("applied migration %s", migration.name)
        applied.append(migration.name)
    return applied


def created_at(db: Database):
    """When this database was first set up (its first migration), local time."""
    row = db.query_one("SELECT min(applied_at) AS at FROM schema_migrations")
    return row["at"] if row else None


def applied_migrations(db: Database) -> list[str]:
    return [r["name"] for r in db.query("SELECT name FROM schema_migrations ORDER BY name")]
