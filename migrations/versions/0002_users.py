"""users: ownership by user id (tf_users), leases tied to the token that took them,
and the reason a study failed on its own (tf_studies.status_reason)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 13:20:00

Until 0001 a study's owner was the free-text `owner` of the token that created it, so a
new token created with the same name acted as that owner. Each distinct owner string
becomes one user (names are unique); tokens and studies point at it by id. Access is
kept exactly as it was: tokens that shared an owner string share a user. When that
string is held by an admin token and by a non-admin one, a warning says so, because
that is the collision this revision exists to stop (revoke the token that should not
be there).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")


def upgrade() -> None:
    op.create_table(
        "tf_users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    conn = op.get_bind()
    owners = (
        conn.execute(sa.text("SELECT owner FROM tf_tokens UNION SELECT owner FROM tf_studies ORDER BY 1"))
        .scalars()
        .all()
    )
    users = sa.table("tf_users", sa.column("name", sa.String), sa.column("created_at", sa.DateTime(timezone=True)))
    now = datetime.now(UTC)
    for owner in owners:
        conn.execute(sa.insert(users).values(name=owner, created_at=now))
    shared = (
        conn.execute(
            sa.text(
                "SELECT owner FROM tf_tokens GROUP BY owner "
                "HAVING SUM(CASE WHEN role = 'admin' THEN 1 ELSE 0 END) > 0 "
                "AND SUM(CASE WHEN role <> 'admin' THEN 1 ELSE 0 END) > 0"
            )
        )
        .scalars()
        .all()
    )
    for owner in shared:
        log.warning(
            "owner %r is shared by admin and non-admin tokens; both now act as user %r "
            "(see `tuneforge token list`, revoke the one that does not belong)",
            owner,
            owner,
        )

    # Nullable first, filled from the names, then made NOT NULL: SQLite rebuilds the
    # table in the batch, PostgreSQL alters it in place.
    with op.batch_alter_table("tf_tokens") as batch:
        batch.add_column(sa.Column("user_id", sa.Integer(), nullable=True))
    op.execute("UPDATE tf_tokens SET user_id = (SELECT u.id FROM tf_users u WHERE u.name = tf_tokens.owner)")
    with op.batch_alter_table("tf_tokens") as batch:
        batch.alter_column("user_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key("fk_tf_tokens_user_id", "tf_users", ["user_id"], ["id"])
        batch.drop_index("ix_tf_tokens_owner")
        batch.create_index("ix_tf_tokens_user_id", ["user_id"], unique=False)
        batch.drop_column("owner")

    with op.batch_alter_table("tf_studies") as batch:
        batch.add_column(sa.Column("owner_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("status_reason", sa.String(length=500), nullable=True))
    op.execute("UPDATE tf_studies SET owner_id = (SELECT u.id FROM tf_users u WHERE u.name = tf_studies.owner)")
    with op.batch_alter_table("tf_studies") as batch:
        batch.alter_column("owner_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key("fk_tf_studies_owner_id", "tf_users", ["owner_id"], ["id"])
        batch.drop_constraint("uq_tf_studies_owner_name", type_="unique")
        batch.create_unique_constraint("uq_tf_studies_owner_name", ["owner_id", "name"])
        batch.drop_column("owner")

    with op.batch_alter_table("tf_leases") as batch:
        batch.add_column(sa.Column("token_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_tf_leases_token_id", "tf_tokens", ["token_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("tf_leases") as batch:
        batch.drop_constraint("fk_tf_leases_token_id", type_="foreignkey")
        batch.drop_column("token_id")

    with op.batch_alter_table("tf_studies") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=100), nullable=True))
    op.execute("UPDATE tf_studies SET owner = (SELECT u.name FROM tf_users u WHERE u.id = tf_studies.owner_id)")
    with op.batch_alter_table("tf_studies") as batch:
        batch.alter_column("owner", existing_type=sa.String(length=100), nullable=False)
        batch.drop_constraint("uq_tf_studies_owner_name", type_="unique")
        batch.create_unique_constraint("uq_tf_studies_owner_name", ["owner", "name"])
        batch.drop_constraint("fk_tf_studies_owner_id", type_="foreignkey")
        batch.drop_column("owner_id")
        batch.drop_column("status_reason")
    # 0001's code knows no 'failed' study: the nearest state it can read.
    op.execute("UPDATE tf_studies SET status = 'cancelled' WHERE status = 'failed'")

    with op.batch_alter_table("tf_tokens") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=100), nullable=True))
    op.execute("UPDATE tf_tokens SET owner = (SELECT u.name FROM tf_users u WHERE u.id = tf_tokens.user_id)")
    with op.batch_alter_table("tf_tokens") as batch:
        batch.alter_column("owner", existing_type=sa.String(length=100), nullable=False)
        batch.drop_index("ix_tf_tokens_user_id")
        batch.create_index("ix_tf_tokens_owner", ["owner"], unique=False)
        batch.drop_constraint("fk_tf_tokens_user_id", type_="foreignkey")
        batch.drop_column("user_id")

    op.drop_table("tf_users")
