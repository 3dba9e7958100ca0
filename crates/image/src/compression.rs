//! Layer compression: from media types (OCI) or magic bytes (docker archives) to a decoder.

use std::io::{self, BufReader, Read};

use crate::ImageError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub(crate) fn from_media_type(
        digest: &str,
        media_type: &str,
    ) -> Result<Compression, ImageError> {
        let mt = media_type.trim();
        if mt.ends_with("tar+gzip") || mt.ends_with("tar.gzip") || mt.ends_with("tar+gz") {
            Ok(Compression::Gzip)
        } else if mt.ends_with("tar+zstd") {
            Ok(Compression::Zstd)
        } else if mt.ends_with(".tar") || mt.ends_with(".diff.tar") {
            Ok(Compression::None)
        } else {
            Err(ImageError::UnsupportedMediaType {
                digest: digest.to_string(),
                media_type: media_type.to_string(),
            })
        }
    }

    pub(crate) fn sniff(head: &[u8]) -> Compression {
        match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            _ => Compression::None,
        }
    }

    pub(crate) fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    pub(crate) fn decoder<'r>(self, r: impl Read + 'r) -> io::Result<Box<dyn Read + 'r>> {
        Ok(match self {
            Compression::None => Box::new(r),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(r))),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        })
    }
}
