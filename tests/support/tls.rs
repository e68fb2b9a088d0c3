//! Throwaway TLS certificates for a test server, made with the `openssl` CLI: a CA and a
//! server certificate it signed, valid for `127.0.0.1` and `localhost`.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// A test CA and a server certificate and key, as PEM bytes.
#[derive(Clone)]
pub struct TlsFiles {
    ca_cert: Vec<u8>,
    server_cert: Vec<u8>,
    server_key: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsFiles { .. }")
    }
}

impl TlsFiles {
    /// Makes a fresh CA and server certificate (P-256 keys, valid for one day).
    pub fn generate() -> TlsFiles {
        let dir =
            std::env::temp_dir().join(format!("distlock-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the TLS work dir");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &dir,
            &[
                &["req", "-x509"][..],
                &ec[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=distlock test CA",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        );
        openssl(
            &dir,
            &[
                &["req"][..],
                &ec[..],
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=localhost",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
             basicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n",
        )
        .expect("write the extensions file");
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "1",
                "-extfile",
                "server.ext",
            ],
        );
        let read = |name: &str| std::fs::read(dir.join(name)).expect("read a generated file");
        let files = TlsFiles {
            ca_cert: read("ca.crt"),
            server_cert: read("server.crt"),
            server_key: read("server.key"),
        };
        let _ = std::fs::remove_dir_all(&dir);
        files
    }

    /// The CA certificate (PEM) that signed the server's certificate.
    pub fn ca_cert(&self) -> &[u8] {
        &self.ca_cert
    }

    /// Where `file` (`ca.crt`, `server.crt`, `server.key`) lives under a node's data dir.
    pub(crate) fn path_in(&self, data_dir: &str, file: &str) -> String {
        format!("{data_dir}/tls/{file}")
    }

    /// The files a server needs, by name.
    pub(crate) fn contents(&self) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("ca.crt", self.ca_cert.clone()),
            ("server.crt", self.server_cert.clone()),
            ("server.key", self.server_key.clone()),
        ]
    }

    /// A redis-rs client for `url` that trusts this CA (and nothing else).
    #[cfg(feature = "tls")]
    pub fn client(&self, url: &str) -> redis::Client {
        redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(self.ca_cert.clone()),
            },
        )
        .expect("TLS client")
    }

    /// Without the `tls` feature redis-rs cannot speak TLS at all.
    #[cfg(not(feature = "tls"))]
    pub fn client(&self, _url: &str) -> redis::Client {
        panic!("a TLS node needs the `tls` feature (cargo test --features tls)")
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run the openssl CLI (Debian: apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
