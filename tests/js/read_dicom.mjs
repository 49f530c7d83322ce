#!/usr/bin/env node
// Read a DICOM SEG or SR with dcmjs, the way OHIF does, and print a JSON summary.
//
// Usage:
//   node read_dicom.mjs <file.dcm> [--source <image.dcm> ...]
//
// Every object is parsed with dcmjs.data.DicomMessage.readFile and naturalised with
// dcmjs.data.DicomMetaDictionary.naturalizeDataset.
//
// SEG: segment attributes are read from SegmentSequence; the frames of PixelData are
// unpacked with dcmjs.data.BitArray.unpack (BINARY) and set pixels are counted per frame
// and per segment.  When the source images are given with --source, the SEG is also
// decoded with dcmjs.adapters.Cornerstone.Segmentation.generateToolState (the labelmap
// path of OHIF's legacy cornerstone SEG loader), using a Cornerstone-style metadata
// provider built from the source images, and set voxels are counted per source image.
//
// SR: ContentSequence is walked; TID 1500 measurement groups are extracted (tracking
// identifier and UID, finding, finding sites, referenced segment, numeric measurements
// with value, unit code and concept name), as well as every NUM item found anywhere.
//
// Output: one JSON document on stdout.  Errors: message on stderr, exit status 1.

import fs from "node:fs";
import path from "node:path";
import dcmjs from "dcmjs";

const { DicomMessage, DicomMetaDictionary, BitArray } = dcmjs.data;
const DCMJS_VERSION = JSON.parse(
  fs.readFileSync(new URL("./node_modules/dcmjs/package.json", import.meta.url), "utf8"),
).version;

// dcmjs logs through loglevel; keep its warnings on stderr only and quiet by default.
dcmjs.log.setLevel("error");

const SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4";
const SR_SOP_CLASSES = {
  "1.2.840.10008.5.1.4.1.1.88.11": "BasicTextSR",
  "1.2.840.10008.5.1.4.1.1.88.22": "EnhancedSR",
  "1.2.840.10008.5.1.4.1.1.88.33": "ComprehensiveSR",
  "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive3DSR",
  "1.2.840.10008.5.1.4.1.1.88.35": "ExtensibleSR",
};

// ---------------------------------------------------------------------------
// generic helpers

function asArray(value) {
  if (value === undefined || value === null) return [];
  return Array.isArray(value) ? Array.from(value) : [value];
}

function first(value) {
  const arr = asArray(value);
  return arr.length ? arr[0] : undefined;
}

function toNumber(value) {
  const v = first(value);
  if (v === undefined || v === null || v === "") return null;
  const n = Number(v);
  return Number.isFinite(n) ? n : null;
}

function toStr(value) {
  const v = first(value);
  if (v === undefined || v === null) return null;
  if (typeof v === "object" && "Alphabetic" in v) return v.Alphabetic; // PN
  return String(v);
}

function code(item) {
  const c = first(item);
  if (!c) return null;
  return {
    CodeValue: toStr(c.CodeValue) ?? toStr(c.LongCodeValue) ?? toStr(c.URNCodeValue),
    CodingSchemeDesignator: toStr(c.CodingSchemeDesignator),
    CodeMeaning: toStr(c.CodeMeaning),
  };
}

function codeKey(c) {
  return c ? `${c.CodingSchemeDesignator}:${c.CodeValue}` : null;
}

function readNaturalized(file) {
  const buf = fs.readFileSync(file);
  const arrayBuffer = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  const dicomData = DicomMessage.readFile(arrayBuffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(dicomData.dict);
  const meta = DicomMetaDictionary.naturalizeDataset(dicomData.meta);
  return { arrayBuffer, dataset, meta };
}

// ---------------------------------------------------------------------------
// SEG

function segmentAttributes(item) {
  const typeItem = first(item.SegmentedPropertyTypeCodeSequence);
  // The type modifier belongs inside the type code item; also report the (non-standard)
  // segment-level placement separately so that a misplaced modifier is visible.
  return {
    segmentNumber: toNumber(item.SegmentNumber),
    label: toStr(item.SegmentLabel),
    description: toStr(item.SegmentDescription),
    algorithmType: toStr(item.SegmentAlgorithmType),
    algorithmName: toStr(item.SegmentAlgorithmName),
    category: code(item.SegmentedPropertyCategoryCodeSequence),
    type: code(item.SegmentedPropertyTypeCodeSequence),
    typeModifiers: asArray(typeItem && typeItem.SegmentedPropertyTypeModifierCodeSequence).map(code),
    segmentLevelTypeModifiers: asArray(item.SegmentedPropertyTypeModifierCodeSequence).map(code),
    anatomicRegions: asArray(item.AnatomicRegionSequence).map(code),
    trackingId: toStr(item.TrackingID),
    trackingUid: toStr(item.TrackingUID),
    recommendedDisplayCIELabValue: asArray(item.RecommendedDisplayCIELabValue).map(Number),
  };
}

function frameInfo(dataset, index) {
  const shared = first(dataset.SharedFunctionalGroupsSequence) || {};
  const perFrame = asArray(dataset.PerFrameFunctionalGroupsSequence)[index] || {};
  const pick = (name) => first(perFrame[name]) || first(shared[name]);
  const segId = pick("SegmentIdentificationSequence");
  const position = pick("PlanePositionSequence");
  const derivation = first(perFrame.DerivationImageSequence);
  const source = derivation ? first(derivation.SourceImageSequence) : undefined;
  return {
    frameNumber: index + 1,
    segmentNumber: segId ? toNumber(segId.ReferencedSegmentNumber) : null,
    imagePositionPatient: position ? asArray(position.ImagePositionPatient).map(Number) : null,
    referencedSOPInstanceUID: source ? toStr(source.ReferencedSOPInstanceUID) : null,
  };
}

function concatPixelData(pixelData) {
  const parts = asArray(pixelData).map((p) => new Uint8Array(p));
  const total = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(total);
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

function readSeg(dataset, meta, arrayBuffer, sourceFiles) {
  const rows = toNumber(dataset.Rows);
  const columns = toNumber(dataset.Columns);
  const numberOfFrames = toNumber(dataset.NumberOfFrames) ?? 1;
  const segmentationType = toStr(dataset.SegmentationType);
  const bitsAllocated = toNumber(dataset.BitsAllocated);
  const transferSyntaxUID = toStr(meta.TransferSyntaxUID);
  const pixelsPerFrame = rows * columns;

  const segments = asArray(dataset.SegmentSequence).map(segmentAttributes);
  const frames = [];
  for (let i = 0; i < numberOfFrames; i++) frames.push(frameInfo(dataset, i));

  // Native (uncompressed) pixel data only: encapsulated transfer syntaxes carry one
  // fragment per frame and would need a decoder.
  const native = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"].includes(
    transferSyntaxUID,
  );
  let pixelDecoding = null;
  if (native) {
    const raw = concatPixelData(dataset.PixelData);
    let unpacked;
    if (bitsAllocated === 1) {
      // BINARY: 1 bit per pixel, little-endian bit order, frames packed back to back
      // without padding (PS3.5 8.1.1); dcmjs unpacks each set bit to 255.
      unpacked = BitArray.unpack(raw);
    } else {
      unpacked = raw;
    }
    const expected = pixelsPerFrame * numberOfFrames;
    if (unpacked.length < expected) {
      throw new Error(`PixelData holds ${unpacked.length} pixels, expected ${expected}`);
    }
    const perSegment = {};
    for (const s of segments) perSegment[s.segmentNumber] = 0;
    frames.forEach((frame, i) => {
      let n = 0;
      let bbox = null;
      const start = i * pixelsPerFrame;
      for (let p = 0; p < pixelsPerFrame; p++) {
        if (unpacked[start + p] === 0) continue;
        n++;
        const r = Math.floor(p / columns);
        const c = p % columns;
        if (!bbox) bbox = { rowMin: r, rowMax: r, columnMin: c, columnMax: c };
        else {
          bbox.rowMin = Math.min(bbox.rowMin, r);
          bbox.rowMax = Math.max(bbox.rowMax, r);
          bbox.columnMin = Math.min(bbox.columnMin, c);
          bbox.columnMax = Math.max(bbox.columnMax, c);
        }
      }
      frame.setPixels = n;
      frame.boundingBox = bbox; // inclusive row/column indices of set pixels, null if empty
      if (frame.segmentNumber !== null) perSegment[frame.segmentNumber] = (perSegment[frame.segmentNumber] || 0) + n;
    });
    pixelDecoding = {
      method: bitsAllocated === 1 ? "dcmjs.data.BitArray.unpack" : "bytes",
      packedBytes: raw.length,
      voxelCounts: perSegment,
    };
  }

  let adapter = null;
  if (sourceFiles.length) adapter = decodeWithCornerstoneAdapter(arrayBuffer, sourceFiles, segOrientation(dataset));

  return {
    rows,
    columns,
    numberOfFrames,
    segmentationType,
    segmentationFractionalType: toStr(dataset.SegmentationFractionalType),
    bitsAllocated,
    frameOfReferenceUID: toStr(dataset.FrameOfReferenceUID),
    referencedSeriesInstanceUIDs: asArray(dataset.ReferencedSeriesSequence).map((s) => toStr(s.SeriesInstanceUID)),
    segments,
    frames,
    pixelDecoding,
    adapter,
  };
}

// Cornerstone-style metadata provider over naturalised source images (what OHIF's
// metadata store returns for these module names).
// The SEG's (shared) plane orientation, to pick one stack's frames out of a multi-frame source.
function segOrientation(seg) {
  const shared = asArray(seg.SharedFunctionalGroupsSequence)[0] || {};
  const plane = asArray(shared.PlaneOrientationSequence)[0];
  return plane ? asArray(plane.ImageOrientationPatient).map(Number) : null;
}

// A functional group macro's first item for frame k of a multi-frame image (per-frame over shared).
function frameGroup(ds, k, keyword) {
  const perFrame = asArray(ds.PerFrameFunctionalGroupsSequence)[k] || {};
  const shared = asArray(ds.SharedFunctionalGroupsSequence)[0] || {};
  return asArray(perFrame[keyword])[0] || asArray(shared[keyword])[0] || {};
}

// One entry per source image; a multi-frame source (Enhanced MR) gives one entry per frame of the
// SEG's orientation, with an imageId ending "?frame=<0-based>" as cornerstone's WADO loader names
// frames (dcmjs matches ReferencedFrameNumber to it), as OHIF shows such a stack.
function sourceImages(file, orientation) {
  const { dataset } = readNaturalized(file);
  if (!dataset.PerFrameFunctionalGroupsSequence) {
    const iop = asArray(dataset.ImageOrientationPatient).map(Number);
    const ipp = asArray(dataset.ImagePositionPatient).map(Number);
    return [{ file, dataset, iop, ipp, frame: null }];
  }
  const out = [];
  asArray(dataset.PerFrameFunctionalGroupsSequence).forEach((_, k) => {
    const iop = asArray(frameGroup(dataset, k, "PlaneOrientationSequence").ImageOrientationPatient).map(Number);
    const ipp = asArray(frameGroup(dataset, k, "PlanePositionSequence").ImagePositionPatient).map(Number);
    const measures = frameGroup(dataset, k, "PixelMeasuresSequence");
    if (orientation && iop.some((v, i) => Math.abs(v - orientation[i]) > 1e-4)) return;
    const frameDataset = { ...dataset, PixelSpacing: measures.PixelSpacing, SliceThickness: measures.SliceThickness };
    out.push({ file, dataset: frameDataset, iop, ipp, frame: k });
  });
  return out;
}

function buildSourceStack(sourceFiles, orientation = null) {
  const images = sourceFiles.flatMap((f) => sourceImages(f, orientation));
  if (!images.length) throw new Error("no source images");
  // Sort along the slice normal, as a viewer sorts a stack.
  const [r0, r1, r2, c0, c1, c2] = images[0].iop;
  const normal = [r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0];
  const dist = (im) => im.ipp[0] * normal[0] + im.ipp[1] * normal[1] + im.ipp[2] * normal[2];
  images.sort((a, b) => dist(a) - dist(b));
  const byId = new Map();
  const imageIds = images.map((im, i) => {
    const id = `dcmfile:${i}:${path.resolve(im.file)}` + (im.frame === null ? "" : `?frame=${im.frame}`);
    byId.set(id, im);
    return id;
  });
  const provider = {
    get(type, imageId) {
      const im = byId.get(imageId);
      if (!im) return undefined;
      const ds = im.dataset;
      switch (type) {
        case "imagePlaneModule":
          return {
            frameOfReferenceUID: toStr(ds.FrameOfReferenceUID),
            rows: toNumber(ds.Rows),
            columns: toNumber(ds.Columns),
            imageOrientationPatient: im.iop,
            rowCosines: im.iop.slice(0, 3),
            columnCosines: im.iop.slice(3, 6),
            imagePositionPatient: im.ipp,
            pixelSpacing: asArray(ds.PixelSpacing).map(Number),
            rowPixelSpacing: toNumber(asArray(ds.PixelSpacing)[0]),
            columnPixelSpacing: toNumber(asArray(ds.PixelSpacing)[1]),
            sliceThickness: toNumber(ds.SliceThickness),
          };
        case "generalSeriesModule":
          return { seriesInstanceUID: toStr(ds.SeriesInstanceUID), modality: toStr(ds.Modality) };
        case "sopCommonModule":
          return { sopInstanceUID: toStr(ds.SOPInstanceUID), sopClassUID: toStr(ds.SOPClassUID) };
        case "imagePixelModule":
          return { rows: toNumber(ds.Rows), columns: toNumber(ds.Columns) };
        case "frameNumber":
          return undefined;
        case "instance":
          return {
            ...ds,
            ImagePositionPatient: im.ipp,
            ImageOrientationPatient: im.iop,
            FrameOfReferenceUID: toStr(ds.FrameOfReferenceUID),
            SeriesInstanceUID: toStr(ds.SeriesInstanceUID),
          };
        default:
          return undefined;
      }
    },
  };
  return { images, imageIds, provider };
}

function decodeWithCornerstoneAdapter(arrayBuffer, sourceFiles, orientation = null) {
  const adapterNs = dcmjs.adapters && dcmjs.adapters.Cornerstone && dcmjs.adapters.Cornerstone.Segmentation;
  if (!adapterNs || typeof adapterNs.generateToolState !== "function") {
    return { available: false, reason: "dcmjs.adapters.Cornerstone.Segmentation.generateToolState not in this dcmjs" };
  }
  const { images, imageIds, provider } = buildSourceStack(sourceFiles, orientation);
  const result = adapterNs.generateToolState(imageIds, arrayBuffer, provider);
  if (!result) return { available: true, decoded: false, reason: "generateToolState returned nothing" };
  const slice = toNumber(images[0].dataset.Rows) * toNumber(images[0].dataset.Columns);
  const voxelCounts = {};
  const perImage = images.map((im) => ({
    sopInstanceUID: toStr(im.dataset.SOPInstanceUID),
    imagePositionPatient: im.ipp,
    voxelCounts: {},
  }));
  for (const buffer of result.labelmapBufferArray) {
    const labels = new Uint16Array(buffer);
    for (let idx = 0; idx < labels.length; idx++) {
      const label = labels[idx];
      if (!label) continue;
      voxelCounts[label] = (voxelCounts[label] || 0) + 1;
      const counts = perImage[Math.floor(idx / slice)].voxelCounts;
      counts[label] = (counts[label] || 0) + 1;
    }
  }
  return {
    available: true,
    decoded: true,
    method: "dcmjs.adapters.Cornerstone.Segmentation.generateToolState",
    labelmapCount: result.labelmapBufferArray.length,
    segmentNumbers: result.segMetadata.data.filter(Boolean).map((s) => toNumber(s.SegmentNumber)),
    segmentsOnImage: imageIds.map((_, i) => asArray(result.segmentsOnFrame[i]).map(Number)),
    voxelCounts,
    perImage,
  };
}

// ---------------------------------------------------------------------------
// SR

const CONCEPTS = {
  imagingMeasurements: "DCM:126010",
  measurementGroup: "DCM:125007",
  trackingIdentifier: "DCM:112039",
  trackingUid: "DCM:112040",
  finding: "DCM:121071",
  findingSite: "SCT:363698007",
  laterality: "SCT:272741003",
  referencedSegment: "DCM:121191",
  sourceImageForSegmentation: "DCM:121233",
  findingCategory: "SCT:276214006",
  sourceSeriesForSegmentation: "DCM:121232",
  procedureReported: "DCM:121058",
};

function srValue(item) {
  const valueType = toStr(item.ValueType);
  switch (valueType) {
    case "TEXT":
      return toStr(item.TextValue);
    case "UIDREF":
      return toStr(item.UID);
    case "CODE":
      return code(item.ConceptCodeSequence);
    case "NUM": {
      const mv = first(item.MeasuredValueSequence);
      if (!mv) return { value: null, unit: null, qualifier: code(item.NumericValueQualifierCodeSequence) };
      const floating = toNumber(mv.FloatingPointValue);
      return {
        value: floating ?? toNumber(mv.NumericValue),
        numericValue: toStr(mv.NumericValue),
        unit: code(mv.MeasurementUnitsCodeSequence),
      };
    }
    case "IMAGE": {
      const ref = first(item.ReferencedSOPSequence) || {};
      return {
        referencedSOPClassUID: toStr(ref.ReferencedSOPClassUID),
        referencedSOPInstanceUID: toStr(ref.ReferencedSOPInstanceUID),
        referencedSegmentNumber: asArray(ref.ReferencedSegmentNumber).map(Number),
        referencedFrameNumber: asArray(ref.ReferencedFrameNumber).map(Number),
      };
    }
    case "PNAME":
      return toStr(item.PersonName);
    case "DATETIME":
      return toStr(item.DateTime);
    case "DATE":
      return toStr(item.Date);
    case "TIME":
      return toStr(item.Time);
    default:
      return null;
  }
}

function contentItems(node) {
  return asArray(node && node.ContentSequence);
}

function conceptKey(item) {
  return codeKey(code(item.ConceptNameCodeSequence));
}

// Every item in the tree with its path of concept names (for generic assertions).
function walk(node, pathSoFar, out) {
  for (const item of contentItems(node)) {
    const concept = code(item.ConceptNameCodeSequence);
    const entry = {
      path: [...pathSoFar, concept ? concept.CodeMeaning : null],
      relationshipType: toStr(item.RelationshipType),
      valueType: toStr(item.ValueType),
      conceptName: concept,
      value: srValue(item),
    };
    out.push(entry);
    walk(item, entry.path, out);
  }
  return out;
}

function numItem(item) {
  const v = srValue(item);
  return {
    conceptName: code(item.ConceptNameCodeSequence),
    value: v.value,
    numericValue: v.numericValue ?? null,
    unit: v.unit,
    modifiers: contentItems(item).map((child) => ({
      relationshipType: toStr(child.RelationshipType),
      valueType: toStr(child.ValueType),
      conceptName: code(child.ConceptNameCodeSequence),
      value: srValue(child),
    })),
  };
}

function measurementGroup(groupItem) {
  const group = {
    trackingIdentifier: null,
    trackingUid: null,
    finding: null,
    findingCategory: null,
    findingSites: [],
    referencedSegment: null,
    sourceSeriesForSegmentation: null,
    sourceImagesForSegmentation: [],
    measurements: [],
    qualitativeEvaluations: [],
    otherItems: [],
  };
  for (const item of contentItems(groupItem)) {
    const key = conceptKey(item);
    const valueType = toStr(item.ValueType);
    if (key === CONCEPTS.trackingIdentifier) group.trackingIdentifier = srValue(item);
    else if (key === CONCEPTS.trackingUid) group.trackingUid = srValue(item);
    else if (key === CONCEPTS.finding) group.finding = srValue(item);
    else if (key === CONCEPTS.findingCategory) group.findingCategory = srValue(item);
    else if (key === CONCEPTS.findingSite) {
      const lat = contentItems(item).find((c) => conceptKey(c) === CONCEPTS.laterality);
      group.findingSites.push({ site: srValue(item), laterality: lat ? srValue(lat) : null });
    } else if (key === CONCEPTS.referencedSegment && valueType === "IMAGE") {
      const v = srValue(item);
      group.referencedSegment = {
        sopClassUID: v.referencedSOPClassUID,
        sopInstanceUID: v.referencedSOPInstanceUID,
        segmentNumber: v.referencedSegmentNumber.length ? v.referencedSegmentNumber[0] : null,
      };
    } else if (key === CONCEPTS.sourceSeriesForSegmentation) group.sourceSeriesForSegmentation = srValue(item);
    else if (key === CONCEPTS.sourceImageForSegmentation && valueType === "IMAGE") {
      const v = srValue(item);
      group.sourceImagesForSegmentation.push({ sopClassUID: v.referencedSOPClassUID, sopInstanceUID: v.referencedSOPInstanceUID });
    }
    else if (valueType === "NUM") group.measurements.push(numItem(item));
    else if (valueType === "CODE" && toStr(item.RelationshipType) === "CONTAINS")
      group.qualitativeEvaluations.push({ conceptName: code(item.ConceptNameCodeSequence), value: srValue(item) });
    else
      group.otherItems.push({
        relationshipType: toStr(item.RelationshipType),
        valueType,
        conceptName: code(item.ConceptNameCodeSequence),
        value: srValue(item),
      });
  }
  return group;
}

function readSr(dataset) {
  const root = dataset;
  const measurementGroups = [];
  for (const container of contentItems(root)) {
    if (conceptKey(container) !== CONCEPTS.imagingMeasurements) continue;
    for (const item of contentItems(container)) {
      if (toStr(item.ValueType) === "CONTAINER" && conceptKey(item) === CONCEPTS.measurementGroup) {
        measurementGroups.push(measurementGroup(item));
      }
    }
  }
  const procedure = contentItems(root).find((c) => conceptKey(c) === CONCEPTS.procedureReported);
  const all = walk(root, [code(root.ConceptNameCodeSequence)?.CodeMeaning ?? null], []);
  return {
    documentTitle: code(root.ConceptNameCodeSequence),
    templateIdentifier: toStr(first(root.ContentTemplateSequence)?.TemplateIdentifier),
    completionFlag: toStr(root.CompletionFlag),
    verificationFlag: toStr(root.VerificationFlag),
    procedureReported: procedure ? srValue(procedure) : null,
    measurementGroups,
    numericItems: all
      .filter((e) => e.valueType === "NUM")
      .map((e) => ({ path: e.path, conceptName: e.conceptName, value: e.value.value, unit: e.value.unit })),
    contentItemCount: all.length,
  };
}

// ---------------------------------------------------------------------------

function main(argv) {
  const args = argv.slice(2);
  if (!args.length || args[0] === "-h" || args[0] === "--help") {
    process.stderr.write("usage: node read_dicom.mjs <file.dcm> [--source <image.dcm> ...]\n");
    return args.length ? 0 : 2;
  }
  const file = args[0];
  let sourceFiles = [];
  if (args.length > 1) {
    if (args[1] !== "--source" || args.length < 3) {
      process.stderr.write("usage: node read_dicom.mjs <file.dcm> [--source <image.dcm> ...]\n");
      return 2;
    }
    sourceFiles = args.slice(2);
  }
  const { arrayBuffer, dataset, meta } = readNaturalized(file);
  const sopClassUID = toStr(dataset.SOPClassUID);
  const out = {
    file: path.resolve(file),
    dcmjsVersion: DCMJS_VERSION,
    sopClassUID,
    sopInstanceUID: toStr(dataset.SOPInstanceUID),
    modality: toStr(dataset.Modality),
    transferSyntaxUID: toStr(meta.TransferSyntaxUID),
    studyInstanceUID: toStr(dataset.StudyInstanceUID),
    seriesInstanceUID: toStr(dataset.SeriesInstanceUID),
    kind: "OTHER",
  };
  if (sopClassUID === SEG_SOP_CLASS) {
    out.kind = "SEG";
    out.seg = readSeg(dataset, meta, arrayBuffer, sourceFiles);
  } else if (sopClassUID in SR_SOP_CLASSES) {
    out.kind = "SR";
    out.srClass = SR_SOP_CLASSES[sopClassUID];
    out.sr = readSr(dataset);
  }
  process.stdout.write(JSON.stringify(out, null, 1) + "\n");
  return 0;
}

try {
  process.exitCode = main(process.argv);
} catch (err) {
  process.stderr.write(`read_dicom.mjs: ${err && err.stack ? err.stack : err}\n`);
  process.exitCode = 1;
}
