//! Certificates for TLS deployments, made at test time: a private CA, a
//! server certificate for `127.0.0.1`/`localhost` that the servers also
//! present to each other (replication, cluster bus), and a client
//! certificate for mutual TLS.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// The PEM files of one private CA and the certificates it signed, in a
/// temporary directory removed on drop.
pub struct TlsFiles {
    dir: PathBuf,
    ca: String,
    client_cert: String,
    client_key: String,
}

impl TlsFiles {
    /// Makes a CA, a server and a client certificate, and writes them.
    pub fn generate() -> TlsFiles {
        let dir = std::env::temp_dir().join(format!(
            "cache-harness-tls-{}-{}",
            std::process::id(),
            crate::node::fastrand_port()
        ));
        std::fs::create_dir_all(&dir).expect("create the certificate directory");

        let mut ca_params = CertificateParams::new(Vec::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cache-harness test CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");

        let leaf = |name: &str, sans: Vec<String>| {
            let mut params = CertificateParams::new(sans).expect("leaf parameters");
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &ca).expect("leaf certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            "redis",
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        );
        let (client_cert, client_key) = leaf("cache-client", Vec::new());

        let files = TlsFiles {
            dir,
            ca: ca.pem(),
            client_cert,
            client_key,
        };
        for (name, pem) in [
            ("ca.crt", &files.ca),
            ("server.crt", &server_cert),
            ("server.key", &server_key),
            ("client.crt", &files.client_cert),
            ("client.key", &files.client_key),
        ] {
            std::fs::write(files.path(name), pem).expect("write a PEM file");
        }
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM), for `CacheBuilder::tls_root_certificate`.
    pub fn ca_pem(&self) -> &[u8] {
        self.ca.as_bytes()
    }

    /// The client certificate (PEM), for `CacheBuilder::tls_client_certificate`.
    pub fn client_cert_pem(&self) -> &[u8] {
        self.client_cert.as_bytes()
    }

    /// The client key (PEM), for `CacheBuilder::tls_client_certificate`.
    pub fn client_key_pem(&self) -> &[u8] {
        self.client_key.as_bytes()
    }

    /// `redis-server` arguments: this certificate, this CA, and client
    /// certificates required.
    pub fn server_args(&self) -> Vec<String> {
        vec![
            format!("--tls-cert-file {}", self.path("server.crt").display()),
            format!("--tls-key-file {}", self.path("server.key").display()),
            format!("--tls-ca-cert-file {}", self.path("ca.crt").display()),
            "--tls-auth-clients yes".to_owned(),
        ]
    }

    /// `redis-cli` arguments to reach a server started with
    /// [`TlsFiles::server_args`].
    pub fn cli_args(&self) -> Vec<String> {
        vec![
            "--tls".to_owned(),
            "--cacert".to_owned(),
            self.path("ca.crt").display().to_string(),
            "--cert".to_owned(),
            self.path("client.crt").display().to_string(),
            "--key".to_owned(),
            self.path("client.key").display().to_string(),
        ]
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A standalone `redis-server` that speaks TLS only and requires a client
/// certificate signed by the [`TlsFiles`] CA. Stopped on drop.
pub struct TlsServer {
    node: crate::node::Node,
    dir: PathBuf,
}

impl TlsServer {
    /// Starts the server on a free port (`--port 0 --tls-port <port>`).
    pub fn start(tls: &TlsFiles) -> TlsServer {
        assert!(crate::redis_server_available(), "{}", crate::install_hint());
        let dir = tls.dir().join("server");
        let node = crate::node::Node::start(
            &dir,
            |port, node_dir| {
                let mut args = vec![
                    format!("--port 0 --tls-port {port}"),
                    "--bind 127.0.0.1".to_owned(),
                    "--save ''".to_owned(),
                    "--appendonly no".to_owned(),
                    format!("--dir {}", node_dir.display()),
                ];
                args.extend(tls.server_args());
                args
            },
            tls.cli_args(),
        );
        TlsServer { node, dir }
    }

    /// `rediss://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.node.port)
    }

    /// `redis-cli` over TLS with the client certificate.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        self.node.cli(args)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.node.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
