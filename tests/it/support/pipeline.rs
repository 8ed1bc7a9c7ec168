//! Shared setup for tests that move a tenant from one cluster to another: a source with a
//! schema and slot, a target with the moved tables provisioned, and a config for the source.

use anyhow::Result;
use switchyard::config::{Config, Env};
use switchyard::lsn::Lsn;
use switchyard::provision::{self, Placement};
use switchyard::source::{ReplicationStream, StreamSettings};
use switchyard::sql::QualifiedName;

use super::PgCluster;

/// An environment with no variables, so tests never depend on the caller's shell.
pub struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

pub struct TwoClusters {
    pub src: PgCluster,
    pub dst: PgCluster,
    pub config: Config,
    _dir: tempfile::TempDir,
}

impl TwoClusters {
    /// Runs `schema` on a new source (it must create publication `sy_pub` and slot `sy`),
    /// then provisions `tables` into `target_schema` on a new target cluster.
    pub async fn start(schema: &str, tables: &[&str], target_schema: &str) -> Result<Self> {
        let src = PgCluster::start()?;
        let dst = PgCluster::start()?;
        src.psql(schema)?;
        let tables: Vec<QualifiedName> = tables
            .iter()
            .map(|t| QualifiedName::parse(t))
            .collect::<Result<_, _>>()?;
        let s = src.client().await?;
        let mut d = dst.client().await?;
        let defs = provision::read_tables(&s, &tables).await?;
        let placement = Placement::into_schema(&tables, target_schema, false);
        provision::apply(&mut d, &provision::plan(&defs, &placement)?, None).await?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("switchyard.toml");
        std::fs::write(
            &path,
            format!(
                "[source]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"switchyard\"\n\
                 dbname = \"postgres\"\nsslmode = \"disable\"\n\
                 [replication]\nslot = \"sy\"\npublication = \"sy_pub\"\n",
                src.port()
            ),
        )?;
        let config = Config::from_toml(&std::fs::read_to_string(&path)?, &path, &NoEnv)?;
        Ok(TwoClusters {
            src,
            dst,
            config,
            _dir: dir,
        })
    }

    /// A replication stream on the source slot from its confirmed position.
    pub async fn stream(&self, ack: bool) -> Result<ReplicationStream> {
        Ok(ReplicationStream::start(StreamSettings {
            endpoint: self.config.source.clone(),
            replication: self.config.replication.clone(),
            ack,
            start: Lsn::INVALID,
            ceiling: None,
        })
        .await?)
    }
}
