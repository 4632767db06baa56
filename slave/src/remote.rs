//! `remote_files`: files a build request asks to be downloaded into the project before anything
//! runs (ClusterRunner's `curl <url> -o $PROJECT_DIR/<name>`). http and https only, size-capped,
//! names that stay inside the project (the master checks them too; checked again here because
//! the slave is the one writing).
use ish_core::paths;
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Downloads remote files; the HTTP client is built on first use (most builds have none).
#[derive(Debug)]
pub struct Downloader {
    client: OnceLock<Result<reqwest::Client, String>>,
    max_bytes: u64,
    timeout: Duration,
}

impl Downloader {
    /// A downloader refusing files over `max_bytes` and downloads slower than `timeout`.
    pub fn new(max_bytes: u64, timeout: Duration) -> Self {
        Self {
            client: OnceLock::new(),
            max_bytes,
            timeout,
        }
    }

    fn client(&self) -> Result<&reqwest::Client, String> {
        self.client
            .get_or_init(|| {
                // reqwest is built without a default TLS provider: use ring (no C toolchain
                // beyond gcc, no OpenSSL). A second install attempt in one process is harmless.
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder()
                    .timeout(self.timeout)
                    .connect_timeout(Duration::from_secs(10))
                    .build()
                    .map_err(|e| format!("cannot create an HTTP client: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Downloads every `name → url` of `files` into `dir`. Errors are messages for the user.
    pub async fn fetch_all(
        &self,
        dir: &Path,
        files: &HashMap<String, String>,
    ) -> Result<(), String> {
        let mut names: Vec<&String> = files.keys().collect();
        names.sort();
        for name in names {
            let url = &files[name];
            self.fetch(dir, name, url).await.map_err(|e| {
                format!("Could not download remote file \"{name}\" from {url}: {e}")
            })?;
        }
        Ok(())
    }

    async fn fetch(&self, dir: &Path, name: &str, url: &str) -> Result<(), String> {
        let rel = paths::safe_relative_path(name)
            .ok_or("the name must be a relative path inside the project")?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err("only http and https URLs are supported".into());
        }
        let mut resp = self
            .client()?
            .get(url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("the server answered {}", resp.status()));
        }
        if resp.content_length().is_some_and(|n| n > self.max_bytes) {
            return Err(format!(
                "it is larger than the limit of {} bytes",
                self.max_bytes
            ));
        }
        let dest = dir.join(rel);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| e.to_string())?;
        }
        // Write beside the destination and rename: a failed download leaves no partial file.
        let tmp = dest.with_file_name(format!(
            ".{}.ish-download",
            dest.file_name().and_then(|n| n.to_str()).unwrap_or("file")
        ));
        let result = async {
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| e.to_string())?;
            let mut total = 0u64;
            while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
                total += chunk.len() as u64;
                if total > self.max_bytes {
                    return Err(format!(
                        "it is larger than the limit of {} bytes",
                        self.max_bytes
                    ));
                }
                f.write_all(&chunk).await.map_err(|e| e.to_string())?;
            }
            f.flush().await.map_err(|e| e.to_string())?;
            tokio::fs::rename(&tmp, &dest)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}
