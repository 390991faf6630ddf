# One click, from a fresh clone: virtual environment, install, check the dataset, pre-resize it when that pays
# off, train with the automatic plan, and show the speed report. The PowerShell twin of quick_train_ultra_fast.sh.
#
#   .\quick_train_ultra_fast.ps1                      # the embedded sample
#   .\quick_train_ultra_fast.ps1 path\to\dataset      # your dataset
#   .\quick_train_ultra_fast.ps1 path\to\dataset --epochs 30 --finetune yes mosaic=0.5   # flags go to train.py
#
# An active virtual environment ($env:VIRTUAL_ENV) is used as it is; otherwise .venv here is created or reused.
# pip only ever runs inside that environment.
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest

$Repo = $PSScriptRoot
Set-Location $Repo

function Fail([string]$Message) {
    Write-Host "quick_train_ultra_fast.ps1: $Message" -ForegroundColor Red
    exit 1
}

function Step([int]$Number, [string]$Title) {
    Write-Host ""
    Write-Host "==> [$Number/5] $Title"
}

$Dataset = Join-Path $Repo 'speedtrain/sample'
$Rest = @($args)
if ($Rest.Count -gt 0 -and -not ([string]$Rest[0]).StartsWith('-')) {
    $Dataset = [string]$Rest[0]
    $Rest = @($Rest | Select-Object -Skip 1)
}
if (-not (Test-Path $Dataset)) { Fail "dataset not found: $Dataset" }
$Project = 'runs/speedtrain'  # where train.py puts run folders, unless a --project flag says otherwise
for ($i = 0; $i -lt $Rest.Count; $i++) {
    if ($Rest[$i] -eq '--project' -and $i + 1 -lt $Rest.Count) { $Project = [string]$Rest[$i + 1] }
    elseif (([string]$Rest[$i]).StartsWith('--project=')) { $Project = ([string]$Rest[$i]).Substring(10) }
}

Step 1 'virtual environment'
if ($env:VIRTUAL_ENV) {
    $Venv = $env:VIRTUAL_ENV
    Write-Host "using the active environment $Venv"
} else {
    $Venv = Join-Path $Repo '.venv'
    if (-not (Test-Path (Join-Path $Venv 'pyvenv.cfg'))) {
        $Python = Get-Command -Name @('py', 'python3', 'python') -ErrorAction SilentlyContinue | Select-Object -First 1
        if (-not $Python) { Fail 'no Python found; install Python 3.10 or newer from python.org' }
        $PythonArgs = @()
        if ($Python.Name -like 'py*.exe' -and $Python.Name -notlike 'python*') { $PythonArgs = @('-3') }
        & $Python.Source @PythonArgs -c 'import sys; sys.exit(sys.version_info < (3, 10))'
        if ($LASTEXITCODE -ne 0) { Fail 'Python 3.10 or newer is needed' }
        & $Python.Source @PythonArgs -m venv $Venv
        if ($LASTEXITCODE -ne 0) { Fail "could not create $Venv" }
        Write-Host "created $Venv"
    } else {
        Write-Host "reusing $Venv"
    }
}
$Py = Join-Path $Venv 'Scripts/python.exe'
if (-not (Test-Path $Py)) { $Py = Join-Path $Venv 'bin/python' }
if (-not (Test-Path $Py)) { Fail "no python in $Venv" }

Step 2 'install speedtrain and its dependencies'
$Stamp = Join-Path $Venv '.speedtrain-installed'
$Fresh = $false
if (Test-Path $Stamp) {
    $Installed = (Get-Item $Stamp).LastWriteTime
    $Fresh = $Installed -gt (Get-Item 'requirements.txt').LastWriteTime -and $Installed -gt (Get-Item 'pyproject.toml').LastWriteTime
}
if ($Fresh) {
    & $Py -c 'import speedtrain, ultralytics' 2>$null
    $Fresh = $LASTEXITCODE -eq 0
}
if ($Fresh) {
    Write-Host 'already installed'
} else {
    & $Py -m pip install --disable-pip-version-check -q -r requirements.txt
    if ($LASTEXITCODE -ne 0) { Fail 'pip install failed (see above)' }
    New-Item -ItemType File -Force -Path $Stamp | Out-Null
}

Step 3 'check the dataset'
& $Py -m speedtrain check --dataset $Dataset
$Status = $LASTEXITCODE
if ($Status -eq 1) {
    Write-Host 'problems listed above: unreadable images are skipped; training stops only on errors'
} elseif ($Status -ne 0) {
    Fail "the dataset check failed (exit $Status)"
}

Step 4 'pre-resize (when most images are much larger than the training size) and train'
& $Py train.py --dataset $Dataset --prepare auto @Rest
if ($LASTEXITCODE -ne 0) { Fail "training failed (exit $LASTEXITCODE)" }

Step 5 'speed report'
$Newest = Get-ChildItem -Path $Project -Filter 'speed_report.json' -Recurse -Depth 1 -ErrorAction SilentlyContinue |
    Sort-Object LastWriteTime | Select-Object -Last 1
if (-not $Newest) { Fail "no speed report found in $Project" }
$Report = $Newest.Directory.FullName
Write-Host "report: $Report/speed_report.json and $Report/speed_report.png"
Write-Host "show it again: $Py -m speedtrain report $Report"
