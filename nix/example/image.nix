# makeDiskImage arguments of the project's main image (packages.<system>.image).
{
  format = "qcow2";
  partitionTableType = "legacy";
  diskSize = "auto";
  additionalSpace = "64M";
  installBootLoader = true;
}
