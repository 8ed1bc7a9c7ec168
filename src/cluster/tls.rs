//! TLS client settings shared by the replication connection and SQL connections.
//!
//! Invariants:
//! - `verify-full` checks the chain against the configured root certificate (or the public
//!   web PKI roots when none is given) and the host name; `verify-ca` checks only the chain;
//!   `require` and `prefer` encrypt without authenticating the server, exactly as libpq does.
//! - The rustls crypto provider is chosen here once (ring), never by process-global default.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;

use super::{ClusterError, SslMode};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls configuration for `mode`; `None` when TLS is disabled.
pub fn client_config(
    mode: SslMode,
    root_cert: Option<&std::path::Path>,
) -> Result<Option<ClientConfig>, ClusterError> {
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClusterError::Tls(format!("no usable TLS protocol versions: {e}")))?;
    let config = match mode {
        SslMode::Disable => unreachable!("handled above"),
        SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider())))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = Arc::new(root_store(root_cert)?);
            if mode == SslMode::VerifyFull {
                builder.with_root_certificates(roots).with_no_client_auth()
            } else {
                let inner =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                        .build()
                        .map_err(|e| ClusterError::Tls(format!("cannot build verifier: {e}")))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(Some(config))
}

fn root_store(root_cert: Option<&std::path::Path>) -> Result<RootCertStore, ClusterError> {
    let mut store = RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                ClusterError::Tls(format!("cannot read sslrootcert {}: {e}", path.display()))
            })?;
            let mut reader = std::io::BufReader::new(pem.as_slice());
            for cert in rustls_pemfile::certs(&mut reader) {
                let cert = cert.map_err(|e| {
                    ClusterError::Tls(format!("bad certificate in {}: {e}", path.display()))
                })?;
                store.add(cert).map_err(|e| {
                    ClusterError::Tls(format!("unusable certificate in {}: {e}", path.display()))
                })?;
            }
            if store.is_empty() {
                return Err(ClusterError::Tls(format!(
                    "sslrootcert {} holds no PEM certificate",
                    path.display()
                )));
            }
        }
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(store)
}

/// `require`/`prefer`: encryption without server authentication (libpq semantics).
/// Signatures are still checked so the handshake itself is sound.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Ok(ok) => Ok(ok),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The `tls-server-end-point` channel binding value (RFC 5929): the server certificate
/// hashed with its signature's hash, where MD5 and SHA-1 are raised to SHA-256.
pub fn server_end_point(cert_der: &[u8]) -> Vec<u8> {
    match signature_hash(cert_der) {
        SignatureHash::Sha384 => sha2::Sha384::digest(cert_der).to_vec(),
        SignatureHash::Sha512 => sha2::Sha512::digest(cert_der).to_vec(),
        SignatureHash::Sha256 => sha2::Sha256::digest(cert_der).to_vec(),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum SignatureHash {
    Sha256,
    Sha384,
    Sha512,
}

/// Reads the certificate's outer signatureAlgorithm OID with a minimal DER walk.
/// Anything unexpected falls back to SHA-256, which is what nearly every server uses;
/// a wrong guess only makes SCRAM-PLUS fail loudly, never authenticate wrongly.
fn signature_hash(der: &[u8]) -> SignatureHash {
    fn header(buf: &[u8]) -> Option<(u8, usize, usize)> {
        let tag = *buf.first()?;
        let first = *buf.get(1)?;
        if first & 0x80 == 0 {
            return Some((tag, 2, usize::from(first)));
        }
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*buf.get(2 + i)?);
        }
        Some((tag, 2 + n, len))
    }
    let oid = (|| {
        let (tag, hl, _) = header(der)?; // Certificate SEQUENCE
        if tag != 0x30 {
            return None;
        }
        let rest = der.get(hl..)?;
        let (_, tbs_hl, tbs_len) = header(rest)?; // tbsCertificate
        let rest = rest.get(tbs_hl.checked_add(tbs_len)?..)?;
        let (tag, alg_hl, _) = header(rest)?; // signatureAlgorithm SEQUENCE
        if tag != 0x30 {
            return None;
        }
        let rest = rest.get(alg_hl..)?;
        let (tag, oid_hl, oid_len) = header(rest)?;
        if tag != 0x06 {
            return None;
        }
        rest.get(oid_hl..oid_hl.checked_add(oid_len)?)
    })();
    const SHA384_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
    const SHA512_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
    const ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    const ECDSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
    match oid {
        Some(SHA384_RSA) | Some(ECDSA_SHA384) => SignatureHash::Sha384,
        Some(SHA512_RSA) | Some(ECDSA_SHA512) => SignatureHash::Sha512,
        _ => SignatureHash::Sha256,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disable_builds_nothing() {
        assert!(client_config(SslMode::Disable, None).unwrap().is_none());
    }

    #[test]
    fn missing_root_cert_is_a_clear_error() {
        let err = client_config(
            SslMode::VerifyFull,
            Some(std::path::Path::new("/nonexistent/ca.crt")),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
    }

    #[test]
    fn signature_hash_follows_certificate_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(signature_hash(cert.der()), SignatureHash::Sha384);
        assert_eq!(server_end_point(cert.der()).len(), 48);

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(signature_hash(cert.der()), SignatureHash::Sha256);
        assert_eq!(server_end_point(cert.der()).len(), 32);
    }

    #[test]
    fn garbage_certificate_falls_back_without_panicking() {
        for junk in [
            &[][..],
            &[0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x06, 0x01],
        ] {
            assert_eq!(signature_hash(junk), SignatureHash::Sha256);
        }
    }
}
