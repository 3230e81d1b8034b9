//! Offline OCI images on an agent.
//!
//! `import` takes an OCI image-layout archive (what `skopeo copy ... oci-archive:` or `umoci`
//! produce), checks every blob against its digest, and keeps blobs content-addressed under
//! `DATA_DIR/images/blobs/sha256/`. Each image's layers are applied in order (whiteouts and
//! opaque directories included) into one read-only root filesystem keyed by the manifest
//! digest, `images/rootfs/<hex>/`, shared by every container of that image: a container gets
//! an overlay with a private upper dir in its sandbox (see `init.rs`). Names map to manifests
//! in `images/refs.json`.

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// What a container needs from its image's configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// One imported image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    /// `sha256:<hex>` of the manifest.
    pub digest: String,
    pub layers: Vec<String>,
    /// Sum of the (compressed) layer sizes.
    pub size: u64,
    pub config: ImageConfig,
    pub imported_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not an OCI image layout archive: {0}")]
    Layout(String),
    #[error("blob {0} does not match its digest")]
    Digest(String),
    #[error("no image named {0:?} on this agent")]
    NotFound(String),
    #[error("image {0:?} is used by running task {1:?}")]
    InUse(String, String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub struct ImageStore {
    root: PathBuf,
    lock: Mutex<()>,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn layout(m: impl std::fmt::Display) -> ImageError {
    ImageError::Layout(m.to_string())
}

/// Only `sha256:<64 lowercase hex>` is accepted: the digest becomes a file name.
fn sha256_hex(digest: &str) -> Result<&str, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| layout(format!("unsupported digest {digest:?} (only sha256)")))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(layout(format!("malformed digest {digest:?}")));
    }
    Ok(hex)
}

impl ImageStore {
    pub fn open(root: &Path) -> std::io::Result<Self> {
        for d in ["blobs/sha256", "rootfs", "tmp"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        // Leftovers of an import that was interrupted.
        for e in std::fs::read_dir(root.join("tmp"))?.flatten() {
            let _ = std::fs::remove_dir_all(e.path());
        }
        Ok(Self {
            root: root.to_path_buf(),
            lock: Mutex::new(()),
        })
    }

    /// Scratch space on the same filesystem as the store.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    fn refs(&self) -> BTreeMap<String, Image> {
        std::fs::read(self.refs_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_refs(&self, refs: &BTreeMap<String, Image>) -> std::io::Result<()> {
        let tmp = self.root.join("refs.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(refs).expect("refs serialize"),
        )?;
        std::fs::rename(tmp, self.refs_path())
    }

    pub fn list(&self) -> Vec<Image> {
        self.refs().into_values().collect()
    }

    /// Finds an image by name or by manifest digest (`sha256:...`, or a unique prefix of 12+
    /// hex digits).
    pub fn get(&self, name: &str) -> Option<Image> {
        let refs = self.refs();
        if let Some(i) = refs.get(name) {
            return Some(i.clone());
        }
        let hex = name.strip_prefix("sha256:").unwrap_or(name);
        if hex.len() < 12 {
            return None;
        }
        let mut hits = refs
            .values()
            .filter(|i| i.digest.trim_start_matches("sha256:").starts_with(hex));
        match (hits.next(), hits.next()) {
            (Some(i), None) => Some(i.clone()),
            _ => None,
        }
    }

    /// The read-only root filesystem of an image.
    pub fn rootfs(&self, image: &Image) -> PathBuf {
        self.root
            .join("rootfs")
            .join(image.digest.trim_start_matches("sha256:"))
    }

    /// Imports an image-layout archive. `name` overrides the name recorded in the archive
    /// (`org.opencontainers.image.ref.name`). Returns the images imported (one per manifest).
    pub fn import(&self, archive: impl Read, name: Option<&str>) -> Result<Vec<Image>, ImageError> {
        let _g = self.lock.lock().expect("image lock");
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        std::fs::create_dir_all(&tmp)?;
        let result = self.import_in(archive, name, &tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }

    fn import_in(
        &self,
        archive: impl Read,
        name: Option<&str>,
        tmp: &Path,
    ) -> Result<Vec<Image>, ImageError> {
        let dir = tmp.join("layout");
        std::fs::create_dir_all(&dir)?;
        let mut ar = tar::Archive::new(archive);
        for entry in ar.entries().map_err(layout)? {
            let mut entry = entry.map_err(layout)?;
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_dir()) {
                continue;
            }
            // unpack_in refuses absolute paths and `..`.
            entry.unpack_in(&dir).map_err(layout)?;
        }
        let oci_layout = std::fs::read(dir.join("oci-layout"))
            .map_err(|_| layout("the archive has no oci-layout file"))?;
        let v: serde_json::Value = serde_json::from_slice(&oci_layout).map_err(layout)?;
        if v["imageLayoutVersion"].as_str() != Some("1.0.0") {
            return Err(layout("oci-layout: imageLayoutVersion must be 1.0.0"));
        }
        let index = ImageIndex::from_file(dir.join("index.json"))
            .map_err(|e| layout(format!("index.json: {e}")))?;
        let blob = |digest: &str| -> Result<Vec<u8>, ImageError> {
            let hex = sha256_hex(digest)?;
            let bytes = std::fs::read(dir.join("blobs/sha256").join(hex))
                .or_else(|_| std::fs::read(self.root.join("blobs/sha256").join(hex)))
                .map_err(|_| layout(format!("blob {digest} is missing")))?;
            if format!("{:x}", Sha256::digest(&bytes)) != hex {
                return Err(ImageError::Digest(digest.into()));
            }
            Ok(bytes)
        };
        // Manifests named by the index, following nested indexes one level (picking
        // linux/amd64 or the first manifest without a platform).
        let mut manifests = Vec::new();
        for d in index.manifests() {
            let ref_name = d
                .annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .cloned();
            match d.media_type() {
                MediaType::ImageIndex => {
                    let inner = ImageIndex::from_reader(&blob(d.digest().as_ref())?[..])
                        .map_err(|e| layout(format!("nested index: {e}")))?;
                    let pick = inner.manifests().iter().find(|m| {
                        m.platform().as_ref().is_none_or(|p| {
                            p.os().to_string() == "linux"
                                && p.architecture().to_string()
                                    == std::env::consts::ARCH
                                        .replace("x86_64", "amd64")
                                        .replace("aarch64", "arm64")
                        })
                    });
                    if let Some(m) = pick {
                        manifests.push((m.digest().to_string(), ref_name));
                    }
                }
                _ => manifests.push((d.digest().to_string(), ref_name)),
            }
        }
        if manifests.is_empty() {
            return Err(layout("index.json names no image manifest"));
        }
        let mut refs = self.refs();
        let mut out = Vec::new();
        for (i, (digest, ref_name)) in manifests.iter().enumerate() {
            let bytes = blob(digest)?;
            let manifest = ImageManifest::from_reader(&bytes[..])
                .map_err(|e| layout(format!("manifest {digest}: {e}")))?;
            let cfg_bytes = blob(manifest.config().digest().as_ref())?;
            let cfg = ImageConfiguration::from_reader(&cfg_bytes[..])
                .map_err(|e| layout(format!("image config: {e}")))?;
            // Keep every blob content-addressed (an already-stored blob is not rewritten).
            let mut keep = vec![digest.clone(), manifest.config().digest().to_string()];
            keep.extend(manifest.layers().iter().map(|l| l.digest().to_string()));
            for d in &keep {
                let hex = sha256_hex(d)?;
                let dst = self.root.join("blobs/sha256").join(hex);
                if !dst.exists() {
                    let src = dir.join("blobs/sha256").join(hex);
                    let mut f = std::fs::File::open(&src)
                        .map_err(|_| layout(format!("blob {d} is missing")))?;
                    let mut h = Sha256::new();
                    std::io::copy(&mut f, &mut h)?;
                    if format!("{:x}", h.finalize()) != hex {
                        return Err(ImageError::Digest(d.clone()));
                    }
                    std::fs::rename(&src, &dst)
                        .or_else(|_| std::fs::copy(&src, &dst).map(|_| ()))?;
                }
            }
            let name = match (name, ref_name) {
                (Some(n), _) if manifests.len() == 1 => n.to_string(),
                (Some(n), _) => format!("{n}-{i}"),
                (None, Some(r)) => r.clone(),
                (None, None) => digest.trim_start_matches("sha256:")[..12].to_string(),
            };
            validate_name(&name)?;
            let rootfs = self.root.join("rootfs").join(sha256_hex(digest)?);
            if !rootfs.exists() {
                let staging = tmp.join("rootfs");
                std::fs::create_dir_all(&staging)?;
                for l in manifest.layers() {
                    let path = self
                        .root
                        .join("blobs/sha256")
                        .join(sha256_hex(l.digest().as_ref())?);
                    apply_layer(&staging, &path, l.media_type())?;
                }
                std::fs::rename(&staging, &rootfs)?;
            }
            let c = cfg.config().clone().unwrap_or_default();
            let image = Image {
                name: name.clone(),
                digest: digest.clone(),
                layers: manifest
                    .layers()
                    .iter()
                    .map(|l| l.digest().to_string())
                    .collect(),
                size: manifest.layers().iter().map(|l| l.size()).sum(),
                config: ImageConfig {
                    entrypoint: c.entrypoint().clone().unwrap_or_default(),
                    cmd: c.cmd().clone().unwrap_or_default(),
                    env: c.env().clone().unwrap_or_default(),
                    working_dir: c.working_dir().clone().unwrap_or_default(),
                    user: c.user().clone().unwrap_or_default(),
                },
                imported_at: crate::tasks::now_ms(),
            };
            refs.insert(name, image.clone());
            out.push(image);
        }
        self.save_refs(&refs)?;
        Ok(out)
    }

    /// Removes a name; blobs and root filesystems no other image uses are deleted.
    /// `in_use` names a running task that uses the image, if any.
    pub fn remove(
        &self,
        name: &str,
        in_use: impl Fn(&Image) -> Option<String>,
    ) -> Result<Image, ImageError> {
        let _g = self.lock.lock().expect("image lock");
        let image = self
            .get(name)
            .ok_or_else(|| ImageError::NotFound(name.into()))?;
        if let Some(task) = in_use(&image) {
            return Err(ImageError::InUse(image.name, task));
        }
        let mut refs = self.refs();
        refs.remove(&image.name);
        self.save_refs(&refs)?;
        if !refs.values().any(|i| i.digest == image.digest) {
            let _ = std::fs::remove_dir_all(self.rootfs(&image));
        }
        // Blobs still referenced: every remaining image's manifest, config and layers.
        let mut live = std::collections::HashSet::new();
        for i in refs.values() {
            live.insert(i.digest.clone());
            live.extend(i.layers.iter().cloned());
            if let Ok(b) = std::fs::read(
                self.root
                    .join("blobs/sha256")
                    .join(i.digest.trim_start_matches("sha256:")),
            ) {
                if let Ok(m) = ImageManifest::from_reader(&b[..]) {
                    live.insert(m.config().digest().to_string());
                }
            }
        }
        for e in std::fs::read_dir(self.root.join("blobs/sha256"))?.flatten() {
            let d = format!("sha256:{}", e.file_name().to_string_lossy());
            if !live.contains(&d) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(image)
    }
}

/// An error with its causes, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn validate_name(name: &str) -> Result<(), ImageError> {
    if name.is_empty()
        || name.len() > 255
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c))
    {
        return Err(layout(format!(
            "image name {name:?}: use 1-255 characters of letters, digits and -_.:/@"
        )));
    }
    Ok(())
}

fn open_layer(path: &Path, media: &MediaType) -> Result<Box<dyn Read>, ImageError> {
    let mut f = std::fs::File::open(path)?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic)?;
    drop(f);
    let f = std::fs::File::open(path)?;
    let gz = n == 2 && magic == [0x1f, 0x8b];
    match media {
        MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => Err(layout(
            "zstd-compressed layers are not supported; re-export the image with gzip layers",
        )),
        _ if gz => Ok(Box::new(flate2::read::GzDecoder::new(f))),
        _ => Ok(Box::new(f)),
    }
}

/// A layer path as normal components only (no root, no `..`), or None.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// `root.join(rel)` if no existing directory on the way is a symlink (a whiteout must never
/// delete through a link out of the root filesystem).
fn inside(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut p = root.to_path_buf();
    let n = rel.components().count();
    for (i, c) in rel.components().enumerate() {
        p.push(c);
        if i + 1 < n {
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => return None,
                _ => {}
            }
        }
    }
    Some(p)
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Applies one layer tar onto `root`: first its whiteouts (`.wh.NAME` deletes NAME,
/// `.wh..wh..opq` empties the directory) against the lower layers, then its entries.
pub fn apply_layer(root: &Path, layer: &Path, media: &MediaType) -> Result<(), ImageError> {
    let mut ar = tar::Archive::new(open_layer(layer, media)?);
    for entry in ar.entries().map_err(layout)? {
        let entry = entry.map_err(layout)?;
        let Some(path) = clean(&entry.path().map_err(layout)?) else {
            continue;
        };
        let Some(base) = path.file_name().map(|b| b.to_string_lossy().into_owned()) else {
            continue;
        };
        let parent = path.parent().unwrap_or(Path::new(""));
        if base == ".wh..wh..opq" {
            if let Some(dir) =
                inside(root, &parent.join("x")).and_then(|p| p.parent().map(Path::to_path_buf))
            {
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        remove_any(&e.path());
                    }
                }
            }
        } else if let Some(target) = base.strip_prefix(".wh.") {
            if let Some(p) = inside(root, &parent.join(target)) {
                remove_any(&p);
            }
        }
    }
    let mut ar = tar::Archive::new(open_layer(layer, media)?);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    ar.set_unpack_xattrs(false);
    for entry in ar.entries().map_err(layout)? {
        let mut entry = entry.map_err(layout)?;
        let Some(path) = clean(&entry.path().map_err(layout)?) else {
            continue;
        };
        let base = path
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default();
        if base.starts_with(".wh.") {
            continue;
        }
        // A lower layer's file replaced by a directory, or the other way round.
        if let Some(dst) = inside(root, &path) {
            if let Ok(m) = std::fs::symlink_metadata(&dst) {
                let is_dir = entry.header().entry_type().is_dir();
                if m.is_dir() != is_dir || (!is_dir && m.file_type().is_symlink()) {
                    remove_any(&dst);
                }
            }
        }
        // unpack_in refuses paths that leave `root`, through `..` or through symlinks.
        entry
            .unpack_in(root)
            .map_err(|e| layout(format!("layer entry {}: {}", path.display(), chain(&e))))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(dir: &Path, name: &str, entries: &[(&str, Option<&str>)]) -> PathBuf {
        let p = dir.join(name);
        let mut b = tar::Builder::new(std::fs::File::create(&p).unwrap());
        for (path, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match content {
                Some(c) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(c.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, path, c.as_bytes()).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.finish().unwrap();
        p
    }

    #[test]
    fn whiteouts_and_opaque_dirs_apply_to_lower_layers_only() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let l1 = layer(
            d.path(),
            "l1",
            &[
                ("etc", None),
                ("etc/a", Some("a")),
                ("etc/b", Some("b")),
                ("opt", None),
                ("opt/old", Some("old")),
                ("gone", None),
                ("gone/x", Some("x")),
            ],
        );
        // The opaque marker comes after a file of the same layer: that file stays.
        let l2 = layer(
            d.path(),
            "l2",
            &[
                ("etc/.wh.a", Some("")),
                ("opt/new", Some("new")),
                ("opt/.wh..wh..opq", Some("")),
                (".wh.gone", Some("")),
                ("etc/c", Some("c")),
            ],
        );
        apply_layer(&root, &l1, &MediaType::ImageLayer).unwrap();
        apply_layer(&root, &l2, &MediaType::ImageLayer).unwrap();
        assert!(!root.join("etc/a").exists());
        assert_eq!(std::fs::read_to_string(root.join("etc/b")).unwrap(), "b");
        assert_eq!(std::fs::read_to_string(root.join("etc/c")).unwrap(), "c");
        assert!(!root.join("opt/old").exists());
        assert_eq!(
            std::fs::read_to_string(root.join("opt/new")).unwrap(),
            "new"
        );
        assert!(!root.join("gone").exists());
        assert!(!root.join("etc/.wh.a").exists());
    }

    #[test]
    fn whiteouts_never_delete_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), "keep").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let l = layer(
            d.path(),
            "l",
            &[
                ("link/.wh.precious", Some("")),
                ("link/.wh..wh..opq", Some("")),
            ],
        );
        apply_layer(&root, &l, &MediaType::ImageLayer).unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.join("precious")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn digests_are_checked_and_must_be_sha256_hex() {
        assert!(sha256_hex("sha512:abc").is_err());
        assert!(sha256_hex("sha256:../../etc").is_err());
        assert!(sha256_hex(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert_eq!(clean(Path::new("../x")), None);
        assert_eq!(clean(Path::new("./a/b")), Some(PathBuf::from("a/b")));
        assert!(validate_name("busybox:latest").is_ok());
        assert!(validate_name("bad name").is_err());
    }
}
